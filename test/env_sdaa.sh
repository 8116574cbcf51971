# Tecorigin SDAA environment, sourced by the test/ scripts for --device=sdaa (or auto on a machine
# with teco-smi). Each value can be set beforehand to override it.

# The Tecorigin SDK's own environment script, when its location is given (TecoPyTorch installs
# torch_sdaa into Python; the driver libraries must be on the library path).
if [[ -n "${TECO_SDK_ENV:-}" && -f "$TECO_SDK_ENV" ]]; then
    # shellcheck disable=SC1090
    source "$TECO_SDK_ENV"
fi

# One OpenMP thread per training process leaves the CPU cores to the data-loading workers.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Card selection: SDAA_VISIBLE_DEVICES plays the part of CUDA_VISIBLE_DEVICES; test/modelzoo.py
# sets it from DEVICE_ID for one-device cases when it is not set already.
