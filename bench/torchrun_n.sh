# Sourced by the multi-process CPU benchmarks (ddp_cpu.sh, sharded_cpu.sh, pipeline_cpu.sh):
# torchrun_n RSS_PREFIX CMD... runs NPROC workers of CMD on a free port through torchrun
# --no-python, each under /usr/bin/time (its peak RSS in KiB to RSS_PREFIX.<rank>), killed after
# RUN_TIMEOUT seconds. Needs NPROC, RUN_TIMEOUT and TORCHRUN set.
torchrun_n() {
  local p=$1
  shift
  timeout -k 10 "$RUN_TIMEOUT" "$TORCHRUN" --standalone --nproc-per-node "$NPROC" --no-python \
    bash -c 'exec /usr/bin/time -f %M -o "$0.$RANK" "$@"' "$p" "$@"
}
