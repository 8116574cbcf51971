# Ascend NPU environment, sourced by the test/ scripts for --device=npu (or auto on a machine with
# npu-smi). Each value can be set beforehand to override it.

# CANN: its set_env.sh puts the driver and toolkit libraries on the paths torch_npu needs.
cann_info=/etc/Ascend/ascend_cann_install.info
if [[ -f "$cann_info" ]]; then
    cann_root="$(grep -i '^Install_Path' "$cann_info" | cut -d= -f2)"
else
    cann_root=/usr/local/Ascend
fi
for set_env in "$cann_root/ascend-toolkit/set_env.sh" "$cann_root/nnal/atb/set_env.sh"; do
    # shellcheck disable=SC1090
    [[ -f "$set_env" ]] && source "$set_env"
done

# Logging: errors only, to files, no event logs (they cost throughput).
export ASCEND_SLOG_PRINT_TO_STDOUT="${ASCEND_SLOG_PRINT_TO_STDOUT:-0}"
export ASCEND_GLOBAL_LOG_LEVEL="${ASCEND_GLOBAL_LOG_LEVEL:-3}"
export ASCEND_GLOBAL_EVENT_ENABLE="${ASCEND_GLOBAL_EVENT_ENABLE:-0}"
# Operator dispatch: the two-level task queue and bound CPU cores keep the host ahead of the device.
export TASK_QUEUE_ENABLE="${TASK_QUEUE_ENABLE:-2}"
export CPU_AFFINITY_CONF="${CPU_AFFINITY_CONF:-1}"
# Memory: expandable segments against fragmentation with changing shapes (evaluation batches).
export PYTORCH_NPU_ALLOC_CONF="${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}"
# HCCL: generous timeouts for the first collective (every rank compiles first) and no whitelist.
export HCCL_WHITELIST_DISABLE="${HCCL_WHITELIST_DISABLE:-1}"
export HCCL_CONNECT_TIMEOUT="${HCCL_CONNECT_TIMEOUT:-1200}"
export HCCL_EXEC_TIMEOUT="${HCCL_EXEC_TIMEOUT:-1800}"
