# Sourced by the ModelZoo scripts (test/*_performance_*.sh, test/*_full_8p.sh): go to the
# repository root, set up the device's environment, run the case (test/modelzoo.py).
# `sh script.sh` runs them in a POSIX shell (dash on Debian, Ubuntu): one line, in its syntax.
[ -n "${BASH_VERSION:-}" ] || { echo "error: the ModelZoo scripts are bash scripts: run them as bash $0 ..." >&2; exit 2; }
set -euo pipefail
TEST_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export CASE_CALLER_DIR="$PWD"  # relative paths in the arguments are the caller's
cd "$TEST_DIR/.."

# The device of --device=, or for auto the one whose management tool is installed.
case_device() {
    local device=auto arg
    for arg in "$@"; do
        case "$arg" in --device=*) device="${arg#--device=}" ;; esac
    done
    if [[ "$device" == auto ]]; then
        if command -v npu-smi >/dev/null 2>&1; then device=npu
        elif command -v teco-smi >/dev/null 2>&1; then device=sdaa
        fi
    fi
    echo "$device"
}

# run_case pretrain|finetune performance|full DEFAULT_NPROC "$@"
run_case() {
    local device arg
    for arg in "${@:4}"; do
        case "$arg" in  # the calling script's header: what it runs, an example, its keys
            -h|--help) sed -n '2,/^[^#]/{/^#/s/^# \{0,1\}//p}' "${BASH_SOURCE[1]}"; exit 0 ;;
        esac
    done
    device="$(case_device "${@:4}")"
    if [[ -f "$TEST_DIR/env_$device.sh" ]]; then
        set +u  # vendor set_env.sh scripts read variables that may be unset
        # shellcheck disable=SC1090
        source "$TEST_DIR/env_$device.sh"
        set -u
    fi
    exec "$(case_python)" "$TEST_DIR/modelzoo.py" "$@"
}

# The Python that runs the case: $PYTHON, else the active virtual environment's, else python3.
case_python() {
    if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"
    elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then echo "$VIRTUAL_ENV/bin/python"
    else echo python3
    fi
}
