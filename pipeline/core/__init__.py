"""What every layer uses: params, sources, tables, atomic writes, lineage, tracking, imports."""
