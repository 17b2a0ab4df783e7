"""Operations tools: release, reproduce, experiments, sweeps, relog, team server, summary."""
