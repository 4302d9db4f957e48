"""Performance tools: how fast a training step runs, where its time goes, how fast it could run.

    run_benchmark, format_table   `ummae bench`: configurations' steps timed side by side (`bench`)
    BenchStep                     the step they time: `ummae pretrain`'s own (`engine.loop.TrainStep`)
    count_flops, flop_counter     FLOPs of a step, the CPU attention kernels counted too
    measure_matmul_flops          the machine's own matmul rate, the reference
    profile_step, format_profile  `--profile`: time and memory per component (`step_profile`)
    matmul_ceiling, format_ceiling, record_flop_calls
                                  `--matmul-ceiling`: the step's matmuls alone (`step_ceiling`)
"""

from .bench import (MATMUL_N, MEMORY_STEPS, BenchStep, count_flops, flop_counter, format_table,
                    measure_matmul_flops, run_benchmark, sync_device, write_json)
from .step_ceiling import format_ceiling, matmul_ceiling, record_flop_calls
from .step_profile import format_profile, profile_step

__all__ = ["run_benchmark", "format_table", "write_json", "BenchStep", "count_flops", "flop_counter",
           "measure_matmul_flops", "sync_device", "profile_step", "format_profile", "matmul_ceiling",
           "format_ceiling", "record_flop_calls", "MATMUL_N", "MEMORY_STEPS"]
