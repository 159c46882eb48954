"""Multi-process start-up: every process runs the same program and calls `initialize` first,
before anything touches a device; the mesh then spans the devices of all processes.

Settings come from the arguments, else the environment:
  JAX_COORDINATOR_ADDRESS  host:port of process 0's coordinator (every process gives the same)
  JAX_NUM_PROCESSES        how many processes
  JAX_PROCESS_ID           this process, 0 .. JAX_NUM_PROCESSES - 1
None of them set: one process (or, with `auto=True`, JAX's own detection on TPU pods and
SLURM). Programs with absl flags call `define_flags()` before parsing and
`initialize_from_flags()` after; the flags are --coordinator_address, --num_processes,
--process_id and --distributed_auto.

Several processes on one machine (tests, launch/local.sh) work on CPU: each gets its own
simulated devices (`cpu_devices`, or JAX_NUM_CPU_DEVICES) and the CPU collectives across
processes go through gloo.
"""

import logging
import os
from collections.abc import Mapping

import jax
from absl import flags

log = logging.getLogger(__name__)

ENV = {'coordinator_address': 'JAX_COORDINATOR_ADDRESS', 'num_processes': 'JAX_NUM_PROCESSES',
       'process_id': 'JAX_PROCESS_ID'}


class DistributedError(ValueError):
    """Multi-process settings that cannot work; the message names the flag or variable."""


def _from_env(name: str, environ: Mapping[str, str]) -> str | int | None:
    raw = environ.get(ENV[name])
    if raw is None or raw == '' or name == 'coordinator_address':
        return raw or None
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f'{ENV[name]}={raw!r} is not an integer') from None


def settings(coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None,
             environ: Mapping[str, str] | None = None) -> dict | None:
    """The arguments for jax.distributed.initialize, each from its argument or else the
    environment; None when none is set anywhere (a single process)."""
    environ = os.environ if environ is None else environ
    given = {'coordinator_address': coordinator_address, 'num_processes': num_processes,
             'process_id': process_id}
    values = {k: v if v is not None else _from_env(k, environ) for k, v in given.items()}
    missing = [k for k, v in values.items() if v is None]
    if len(missing) == len(values):
        return None
    if missing:
        raise DistributedError(
            'a multi-process start needs all of coordinator_address, num_processes and '
            f'process_id; missing: {", ".join(f"--{k} (or {ENV[k]})" for k in missing)}')
    n, i = values['num_processes'], values['process_id']
    if n < 1 or not 0 <= i < n:
        raise DistributedError(f'process_id must be in [0, num_processes={n}), got {i}; '
                               'number the processes 0 .. num_processes - 1')
    if ':' not in values['coordinator_address']:
        raise DistributedError(f"coordinator_address {values['coordinator_address']!r} needs "
                               "a port, e.g. '10.0.0.1:1234'")
    return values


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cpu_devices: int | None = None,
               auto: bool = False) -> bool:
    """Joins this process to the others (jax.distributed.initialize). Returns True when
    running as one of several processes. Call it before any other use of JAX."""
    if cpu_devices is not None:
        jax.config.update('jax_num_cpu_devices', cpu_devices)
    values = settings(coordinator_address, num_processes, process_id)
    single = values['num_processes'] == 1 if values is not None else not auto
    if single:
        return False
    # CPU devices of different processes reach each other through gloo; GPU/TPU devices use
    # their own collectives and ignore this.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(**(values or {}))
    log.info('process %d of %d, %d local devices of %d', jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --coordinator_address, --num_processes, --process_id (once)."""
    if 'coordinator_address' in flag_values:
        return
    flags.DEFINE_string('coordinator_address', None,
                        f'host:port of process 0 (default ${ENV["coordinator_address"]})',
                        flag_values=flag_values)
    flags.DEFINE_integer('num_processes', None,
                         f'number of processes (default ${ENV["num_processes"]})',
                         flag_values=flag_values)
    flags.DEFINE_integer('process_id', None, f'this process (default ${ENV["process_id"]})',
                         flag_values=flag_values)
    flags.DEFINE_bool('distributed_auto', False, 'with none of the three above: let JAX find '
                      'the processes itself (Cloud TPU pod slices, SLURM, ...)',
                      flag_values=flag_values)


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS, **kwargs) -> bool:
    return initialize(flag_values.coordinator_address, flag_values.num_processes,
                      flag_values.process_id, auto=flag_values.distributed_auto, **kwargs)


def coordinator_address() -> str | None:
    """host:port of process 0's coordinator once initialized (given, or found by JAX's
    auto-detection); None in a single process."""
    from jax._src import distributed as jax_distributed  # JAX exposes it nowhere else
    return jax_distributed.global_state.coordinator_address
