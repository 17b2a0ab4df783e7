#!/usr/bin/env bash
# Regenerate the locks from requirements.txt and requirements-assets.txt (needs uv: pip install uv).
# Local wheel folders or indexes are added with UV_FIND_LINKS / UV_EXTRA_INDEX_URL.
set -euo pipefail
cd "$(dirname "$0")/.."
common=(--generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_34
  --index-strategy unsafe-best-match --no-header --quiet)
cpu_index=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
# Versions seen working: the packages of the current .venv constrain the transitive ones (not the
# top-level pins of requirements*.txt). LOCK_FRESH=1 resolves the newest that fit instead.
if [[ -x .venv/bin/pip && -z "${LOCK_FRESH:-}" ]]; then
  top=$(grep -hoE '^[A-Za-z0-9_.-]+' requirements.txt requirements-assets.txt | tr 'A-Z_.' 'a-z--')
  .venv/bin/pip freeze --exclude-editable | grep '==' | while IFS= read -r line; do
    name=$(echo "${line%%==*}" | tr 'A-Z_.' 'a-z--')
    grep -qx "$name" <<<"$top" || echo "$line"
  done > locks/.constraints
  common+=(--constraint locks/.constraints)
fi
# CPU: torch's +cpu build (from PyTorch's CPU index, or a local wheel folder in UV_FIND_LINKS).
sed 's/^torch==\([0-9.]*\)$/torch==\1+cpu/' requirements.txt > locks/.cpu.in
uv pip compile locks/.cpu.in "${common[@]}" --extra-index-url "$cpu_index" -o locks/cpu.txt \
  || uv pip compile locks/.cpu.in "${common[@]}" -o locks/cpu.txt
rm -f locks/.cpu.in
awk '/^torch==/{p=1} p&&/^    #/{exit} p' locks/cpu.txt > locks/cpu-torch.txt
# GPU: PyPI's CUDA build of torch, without local wheel folders.
env -u UV_FIND_LINKS uv pip compile requirements.txt "${common[@]}" -o locks/gpu.txt
uv pip compile requirements-assets.txt "${common[@]}" --no-deps -o locks/assets.txt
sed -i 's#locks/\.cpu\.in#requirements.txt#' locks/cpu.txt
python3 - locks/*.txt <<'PY'  # the constraints file is temporary: no "via" lines name it
import sys
for name in sys.argv[1:]:
    lines = [x for x in open(name).read().splitlines() if ".constraints" not in x]
    keep = [x for i, x in enumerate(lines)
            if not (x.strip() == "# via" and not lines[i + 1 : i + 2][0:1] == [] and
                    not lines[i + 1].startswith("    #   "))]
    open(name, "w").write("\n".join(keep) + "\n")
PY
rm -f locks/.constraints
echo "locks written: $(ls locks/*.txt | tr '\n' ' ')"
