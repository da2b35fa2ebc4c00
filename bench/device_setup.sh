#!/usr/bin/env bash
# Source this on the device machine (repo root, .whl carried):  source bench/device_setup.sh
# Installs the project's wheels into /tmp/site (shadowing the image's transformers 5.17) and sets PYTHONPATH.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
python3 - <<'PY'
import torch, transformers, peft, bitsandbytes, os, glob
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
print("transformers", transformers.__version__, transformers.__file__)
print("peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)
libs = glob.glob(os.path.join(os.path.dirname(bitsandbytes.__file__), "libbitsandbytes_cuda*.so"))
print("bnb libs", [os.path.basename(l) for l in libs])
try:
    from bitsandbytes.cextension import lib, BNB_BACKEND
    print("bnb backend", BNB_BACKEND, "lib", getattr(lib, "_name", None) or getattr(getattr(lib, "_lib", None), "_name", lib))
except Exception as e:
    print("bnb cextension:", repr(e)[:200])
try:
    import liger_kernel; print("liger-kernel", getattr(liger_kernel, "__version__", "?"))
except ImportError:
    print("liger-kernel: not installed (not in the project's venv)")
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    pass
PY
