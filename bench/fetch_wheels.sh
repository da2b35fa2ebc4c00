#!/usr/bin/env bash
# Regenerate .whl/ (device wheels, Python 3.12 x86_64) at exactly the versions in the project's .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS="transformers peft bitsandbytes fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv
typing-inspection annotated-types annotated-doc sqlalchemy alembic mako uvicorn h11 httpx httpcore anyio sniffio
python-multipart prometheus_client uvloop httptools typer click rich shellingham markdown-it-py mdurl pygments gguf
opentelemetry-api datasets dill multiprocess liger-kernel
boto3 botocore s3transfer jmespath"
FREEZE=$(.venv/bin/pip freeze)
SPECS=()
for p in $PKGS; do
  norm=$(echo "$p" | tr 'A-Z_' 'a-z-')
  line=$(echo "$FREEZE" | awk -F'==' -v n="$norm" '{k=tolower($1); gsub("_","-",k); if (k==n) print $0}')
  if [ -n "$line" ]; then SPECS+=("$line"); else echo "skip $p (not in venv)" >&2; fi
done
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${SPECS[@]}"
# Not a project dependency: bench/serve.py --py-spy profiles the API process with it on the device.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux1_x86_64 \
  -d .whl py-spy==0.4.1
du -sh .whl
# Slim bitsandbytes: keep only the CUDA 13.x (device: torch cu130) and CPU libraries; the full wheel is ~43 MiB
# and would blow the device tool's 64 MiB carry limit. RECORD is rewritten to match.
python3 - <<'PY'
import glob, re, zipfile, os
for w in glob.glob(".whl/bitsandbytes-*.whl"):
    keep = re.compile(r"libbitsandbytes_(cuda13\d|cpu)\.so$")
    tmp = w + ".tmp"
    with zipfile.ZipFile(w) as zi, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zo:
        for it in zi.infolist():
            n = it.filename
            if n.endswith(".so") and "libbitsandbytes_" in n and not keep.search(n):
                continue
            data = zi.read(n)
            if n.endswith(".dist-info/RECORD"):
                lines = [l for l in data.decode().splitlines()
                         if not ("libbitsandbytes_" in l and ".so," in l and not keep.search(l.split(",")[0]))]
                data = ("\n".join(lines) + "\n").encode()
            zo.writestr(it, data)
    os.replace(tmp, w)
    print("slimmed", w, os.path.getsize(w) // 2**20, "MiB")
PY
du -sh .whl
