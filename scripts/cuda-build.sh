#!/usr/bin/env bash
# Builds the `tollgate` binary with candle's CUDA backend (`--features cuda`) on any Linux x86-64
# machine with the Rust toolchain, Python 3 + pip and gcc: no GPU, no driver, no CUDA install.
#
# The CUDA 13.0 compiler and libraries come from NVIDIA's PyPI wheels, installed once into a
# cache outside the repo (TOLLGATE_CUDA_DIR, default ~/.cache/tollgate/cuda-13.0) and reused.
# The wheels unpack into one `nvidia/cu13` tree; this script adds what candle's build expects
# of a toolkit (`lib64` beside `lib`, unversioned `lib*.so` names) and, since the wheels carry
# no driver, a stub `libcuda.so` (soname `libcuda.so.1`) to link against, as the toolkit's own
# `lib/stubs` does. The binary it makes loads the real driver and libraries on a GPU machine.
#
#   scripts/cuda-build.sh                 # sm_90 (H100/H200)
#   CUDA_COMPUTE_CAP=89 scripts/cuda-build.sh
#   scripts/cuda-build.sh --locked        # extra arguments go to `cargo build`
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$SECONDS

# CUDA 13.0 update 2, pinned. nvcc needs crt, nvvm, the runtime headers and cccl beside it;
# candle-core links cudarc against nvrtc, curand, cublas and cublasLt.
PACKAGES=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-nvrtc==13.0.88
    nvidia-curand==10.4.0.35
    nvidia-cublas==13.1.0.3
)
CACHE="${TOLLGATE_CUDA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tollgate/cuda-13.0}"
SITE="$CACHE/site-packages"
CUDA="$SITE/nvidia/cu13"
STAMP="$CACHE/installed.txt"

if [[ ! -x "$CUDA/bin/nvcc" || "$(cat "$STAMP" 2>/dev/null)" != "${PACKAGES[*]}" ]]; then
    echo "==> installing the CUDA 13.0 compiler and libraries from PyPI into $CACHE"
    rm -rf "$SITE" "$STAMP"
    mkdir -p "$CACHE"
    # --target writes only into our cache, so an externally managed system Python is no obstacle.
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore \
        --no-deps --no-compile --target "$SITE" "${PACKAGES[@]}"
    echo "${PACKAGES[*]}" >"$STAMP"
else
    echo "==> CUDA 13.0 from $CACHE (cached)"
fi

# The toolkit layout candle's kernel build and cudarc's link step look for.
ln -sfn lib "$CUDA/lib64"
for lib in libcudart.so.13 libnvrtc.so.13 libcurand.so.10 libcublas.so.13 libcublasLt.so.13; do
    ln -sf "$lib" "$CUDA/lib/${lib%%.so.*}.so"
done

# A link-time stand-in for the driver library, like the toolkit's own `lib/stubs/libcuda.so`:
# every `cu*` entry point that cuda.h declares (also after its `_v2`/`_v3` renaming macros), each
# returning CUDA_ERROR_STUB_LIBRARY (34). The binary records `libcuda.so.1`, which the NVIDIA
# driver provides on a GPU machine; were the stub ever loaded, CUDA calls fail cleanly.
STUBS="$CUDA/lib/stubs"
mkdir -p "$STUBS"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
{
    gcc -E -P -I"$CUDA/include" "$CUDA/include/cuda.h"
    cat "$CUDA/include/cuda.h"
} | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' \t(' | sort -u \
    | sed 's/.*/int &(void) { return 34; }/' >"$work/libcuda.c"
if [[ ! -f "$STUBS/libcuda.so" ]] || ! cmp -s "$work/libcuda.c" "$STUBS/libcuda.c"; then
    echo "==> building the link stub $STUBS/libcuda.so ($(wc -l <"$work/libcuda.c") entry points)"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$work/libcuda.so" "$work/libcuda.c"
    mv "$work/libcuda.so" "$STUBS/libcuda.so"
    mv "$work/libcuda.c" "$STUBS/libcuda.c"
fi

export CUDA_HOME="$CUDA" NVCC="$CUDA/bin/nvcc"
export PATH="$CUDA/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
echo "==> cargo build --release -p tollgate --features cuda (compute capability $CUDA_COMPUTE_CAP)"
cargo build --release -p tollgate --bin tollgate --features cuda "$@"

TARGET_DIR="${CARGO_TARGET_DIR:-$(cargo metadata --format-version 1 --no-deps \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}"
BIN="$TARGET_DIR/release/tollgate"
# Load it once with every symbol bound up front (LD_BIND_NOW): the CUDA libraries from the
# wheels and the stub standing in for the driver's libcuda.so.1 must resolve all of them.
RUN_STUBS="$CACHE/run-stubs"
mkdir -p "$RUN_STUBS"
ln -sf "$STUBS/libcuda.so" "$RUN_STUBS/libcuda.so.1"
LD_BIND_NOW=1 LD_LIBRARY_PATH="$RUN_STUBS:$CUDA/lib" "$BIN" --version
echo "==> built $BIN (CUDA, sm_$CUDA_COMPUTE_CAP)"
echo "==> elapsed: $((SECONDS - START)) s"
