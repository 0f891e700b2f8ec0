"""Process-wide JAX setup the entry points do once: multi-host initialisation, the
persistent compilation cache (launch/README.md explains both), how the host's allocator
keeps freed memory, which library runs XLA:CPU's convolutions, and how jax.random's hash is
lowered on CPU.

All must run before the first computation (the hash's lowering: before the programs it
should apply to are traced); `cli.main` calls them right after parsing
flags, a notebook may call them in its first cell. `step_compiler_options` is the exception:
the XLA options the engine compiles its own steps with, per program, whenever they compile.
"""

import ctypes
import ctypes.util
import functools
import os
import platform
import warnings

import jax

# Environment variables that mean "this process is one of several": an explicit coordinator
# (any launcher), SLURM with more than one task, a TPU slice whose worker list names more
# than one host (GKE / queued resources set it; plain TPU VMs answer through the metadata
# server instead, so `launch/tpu_vm.sh run` passes --distributed=true).
_COORDINATOR_ENV = "JAX_COORDINATOR_ADDRESS"


def _several(value: str | None) -> bool:
    return value is not None and len([v for v in value.split(",") if v.strip()]) > 1


def multiprocess_env(environ=None) -> str | None:
    """Which launcher's variables say this process is one of several, or None."""
    env = os.environ if environ is None else environ
    if env.get(_COORDINATOR_ENV):
        return _COORDINATOR_ENV
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "SLURM"
    for name in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES"):
        if _several(env.get(name)):
            return name
    return None


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           environ=None) -> str | None:
    """Call `jax.distributed.initialize` when this is a multi-process run; say why, or None.

    mode: "auto" (explicit arguments or a launcher's environment variables decide),
    "true" (always: JAX detects the cluster, e.g. a TPU VM slice via its metadata server),
    "false" (never). Explicit arguments go to JAX as given; missing ones JAX detects.
    """
    if mode not in ("auto", "true", "false"):
        raise ValueError(f"--distributed={mode!r}: expected auto, true or false")
    explicit = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                      process_id=process_id).items() if v is not None}
    if mode == "false":
        if explicit:
            raise ValueError(f"--distributed=false contradicts {sorted(explicit)}")
        return None
    reason = "flags " + ",".join(sorted(explicit)) if explicit else (
        "--distributed=true" if mode == "true" else multiprocess_env(environ))
    if reason is None:
        return None
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    jax.distributed.initialize(**explicit)
    return reason


def default_cache_dir() -> str:
    """$JAXML_CACHE_DIR, else ~/.cache/jaxml/xla."""
    return os.environ.get("JAXML_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "jaxml", "xla")


def enable_compile_cache(enabled: bool = True, directory: str | None = None,
                         min_compile_time_s: float = 0.1) -> str | None:
    """Turn JAX's persistent compilation cache on (in `directory`) or off; the directory used, or None.

    JAX's own default threshold (1 s) leaves most of a small experiment's programs uncached;
    0.1 s caches every train/eval step that takes noticeable time to compile. A directory
    set by JAX_COMPILATION_CACHE_DIR (the test suite does) wins over the default, not over
    an explicit `directory`.
    """
    if not enabled:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_cache_dir()
    if "://" not in directory:  # gs:// etc. are created by JAX's file layer
        os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", directory)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    return directory


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_host_memory(enabled: bool = True) -> str | None:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the
    kernel; what was set, or None (disabled, or not glibc).

    XLA:CPU allocates each step's temporaries as one block (ResNet-20: 145 MB, the GPT: 130
    MB) and frees it after the step. glibc maps blocks over 32 MB fresh from the kernel, and
    a worker thread's blocks over 64 MB always (its arena cannot hold them, whatever
    M_MMAP_MAX says), so every step page-faults its temporaries back in: 37,000 faults, 35-60
    ms of ResNet-20's ~350 ms step on a 2-core VM. One arena, no mmap and no trimming keep
    the block, as tcmalloc or jemalloc would. The cost is host memory: the heap grows by a few
    blocks before it settles, and never shrinks (XLA at times allocates a call's temporaries
    before the previous call's are freed, and glibc 2.36 cannot hand its posix_memalign(64, n)
    a freed block of exactly n bytes, so each overlap leaves a block only smaller requests
    reuse). At the benchmark's sizes (2 cores, 80 steps) ResNet-20's peak RSS went 717 -> 1028
    MB with 162 MB of temporaries, the GPT's 697 -> 994 MB with 113 MB; after at most 15 steps
    no step faulted (median step 173 -> 157 ms, 105 -> 82 ms). Call before the first
    computation: threads started earlier keep their own arenas.
    """
    if not enabled or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        warnings.warn("keep_host_memory() after JAX started its backend: XLA's worker threads keep their "
                      "own malloc arenas, so their large blocks still go back to the kernel; call it first, "
                      "as cli.main does (in a notebook: the first cell)", stacklevel=2)
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    settings = ((_M_ARENA_MAX, 1, "M_ARENA_MAX=1"), (_M_MMAP_MAX, 0, "M_MMAP_MAX=0"),
                (_M_TRIM_THRESHOLD, 2**31 - 1, "M_TRIM_THRESHOLD=2^31-1"))
    done = [name for param, value, name in settings if libc.mallopt(param, value) == 1]
    return ", ".join(done) or None


# The XLA flag naming which ops XLA:CPU hands to YNNPACK (jaxlib 0.10's default: dots, convolutions, reductions).
_YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
_REGION_ANALYSIS = "xla_cpu_copy_insertion_use_region_analysis"
_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"
_convolutions_wanted = [True]  # the last multithreaded_convolutions(enabled); on by default, as in the CLI


def jaxlib_version() -> tuple[int, int]:
    """(major, minor) of the installed jaxlib."""
    from jaxlib import version

    major, minor = version.__version__.split(".")[:2]
    return int(major), int(minor)


def multithreaded_convolutions(enabled: bool = True) -> str | None:
    """Let XLA:CPU run every convolution on all cores; the XLA flag added, or None (nothing to do).

    jaxlib 0.10 hands XLA:CPU's convolutions (32 channels and more) to YNNPACK, which runs
    each on one thread: on 2 cores a ResNet-20 convolution took 3.3 ms where Eigen's, which
    XLA uses otherwise, takes 1.7 (its kernel gradient 7.7 against 3.2), and the other core
    sat idle. The flag keeps YNNPACK for dots and reductions and gives convolutions back to
    Eigen: the LeNet CNN step 0.74-0.79x, ResNet-20 0.81-0.91x, the others unchanged (2 AVX2 cores).
    On 2 cores with AVX-512 (2026-12-07; each step compiled both ways in one process, timed
    interleaved) the CNN's step without it took 1.43x as long, ResNet-20's 1.35x, the 8x8
    U-Net's 1.01x (0.85x the CPU time). jaxlib 0.12's
    YNNPACK convolutions use every core (and beat Eigen's kernel gradient), so there it adds
    nothing; a `--xla_cpu_experimental_ynn_fusion_type` already in XLA_FLAGS stands.
    XLA reads XLA_FLAGS once, when the backend starts: call this before the first computation.
    Called later (or never), the engine's own steps still get the setting, per program
    (`step_compiler_options`); `enabled=False` takes it from them too.
    """
    _convolutions_wanted[0] = enabled
    if not enabled or jaxlib_version() >= (0, 11):
        return None
    current = os.environ.get("XLA_FLAGS", "")
    if _YNN_FUSION_FLAG in current:
        return None
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        warnings.warn("multithreaded_convolutions() after JAX started its backend: XLA has read XLA_FLAGS "
                      "already, so only the engine's train and eval steps get convolutions on all cores (per "
                      "program); other jitted functions keep YNNPACK's single thread. Call it first, as "
                      "cli.main does (in a notebook: the first cell)", stacklevel=2)
        return None
    flag = f"--{_YNN_FUSION_FLAG}=individual_dot,reduce"
    os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()
    return flag


def cpu_devices(count: int = 1) -> str | None:
    """Run the host's CPU as `count` XLA devices; the XLA flag added, or None (nothing to do).

    The engine shards each batch over every device it is given (data parallel; BatchNorm
    statistics and gradients still cover the whole batch), so each device's program runs
    its share of the batch and XLA runs the programs side by side. On 2 cores with jaxlib
    0.10 and its single-threaded YNNPACK convolutions (so with `multithreaded_convolutions`
    off: the CLI turns it off for `--cpu_devices` above 1) the diffusion U-Net's step took
    0.65-0.76x the time of one device with Eigen's convolutions, ResNet-20's 0.82-0.90x, the CNN's
    1.0x; the ViT (1.17x), ResNet-50 at batch 8 (2x) and the LSTM (1.8x) were slower. On
    jaxlib 0.12, whose convolutions use every core anyway, the U-Net and ResNet-20 took 0.97x.
    The global batch must divide by `count`. A device count XLA_FLAGS names already stands
    (the tests' 8); XLA reads the flag when the backend starts: call this before the first
    computation (later it warns and does nothing).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"cpu_devices({count!r}): expected a device count >= 1")
    if count == 1:
        return None
    current = os.environ.get("XLA_FLAGS", "")
    if _DEVICE_COUNT_FLAG in current:
        return None
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        warnings.warn(f"cpu_devices({count}) after JAX started its backend: XLA has read XLA_FLAGS already, "
                      f"so the CPU stays {len(jax.devices('cpu'))} device(s). Call it first, as cli.main does "
                      f"(in a notebook: the first cell)", stacklevel=2)
        return None
    flag = f"--{_DEVICE_COUNT_FLAG}={count}"
    os.environ["XLA_FLAGS"] = f"{current} {flag}".strip()
    return flag


def step_compiler_options(platform: str) -> dict[str, object]:
    """XLA compile options the engine gives its jit-mode train and eval steps on `platform`
    (`parallel.setup` puts `config.parallel.xla_options` over them, so a user's value wins):

    - XLA:CPU's copy insertion with region analysis
      (`xla_cpu_copy_insertion_use_region_analysis`): XLA then drops the copies it otherwise
      makes of donated params at the start of every step (the CNN's dense kernel, 512 KB, and
      others): the same program otherwise, bitwise the same updates, and steps 0.92-0.95x (CNN),
      0.94x (ResNet-50), 0.96-0.99x (U-Net, LSTM, ResNet-20), 1.0x (GPT, ViT) on jax 0.10.2
      (`benchmarks.run --xla-options`, 2 cores, 2026-12-07); on 0.12.1 ResNet-50 0.95x, the
      CNN 1.0x. Left out where XLA_FLAGS names it, or where this jaxlib has no such option.
    - on jaxlib 0.10, the per-program form of `multithreaded_convolutions()`, so that the steps
      get convolutions on all cores also where XLA_FLAGS could not carry the setting: a notebook
      that ran JAX before calling it, research code that never does. Not after
      `multithreaded_convolutions(False)`, nor where XLA_FLAGS names the fusion types already
      (set early, or the user's own choice: it stands).

    Empty off CPU.
    """
    if platform != "cpu":
        return {}
    flags, options = os.environ.get("XLA_FLAGS", ""), {}
    if _REGION_ANALYSIS not in flags and _accepts(_REGION_ANALYSIS, True):
        options[_REGION_ANALYSIS] = True
    if jaxlib_version() < (0, 11) and _convolutions_wanted[0] and _YNN_FUSION_FLAG not in flags:
        # The same choice as the XLA_FLAGS value `individual_dot,reduce`, in the option's enum names.
        options[_YNN_FUSION_FLAG] = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    return options


@functools.cache
def _accepts(name: str, value) -> bool:
    """Whether this jaxlib's XLA takes the compile option (one empty program, compiled once)."""
    try:
        jax.jit(lambda: 0, compiler_options={name: value}).lower().compile()
    except Exception:  # jax.errors.JaxRuntimeError: "No such compile option"
        return False
    return True


def unrolled_threefry(enabled: bool = True) -> str | None:
    """Lower `jax.random`'s threefry hash on CPU as on GPU and TPU: its five rounds of four
    mixing steps written out instead of a five-iteration while loop; what was done, or None.

    The random bits are the same (the same function, only its HLO differs). JAX rolls the
    rounds into a loop on CPU to compile faster; XLA:CPU then runs each draw (dropout masks,
    random crops, keys split in the step) as a loop of tiny kernels, one after the other: the
    LeNet CNN's step ran 12 of them. Unrolled, train steps took 0.94-0.97x (CNN, GPT), 0.85-0.94x
    (ViT) and 1.0x (ResNet-20, U-Net) the time, for 0.1-0.3 s more compile time (2 cores,
    2026-12-06). Applies to programs lowered after the call; `enabled=False` restores JAX's
    CPU lowering. Uses JAX's internal lowering registry: where that has moved, it does nothing
    and returns None.
    """
    try:
        from jax._src.interpreters import mlir
        from jax._src.random import threefry2x32 as threefry
        rule = threefry._threefry2x32_lowering_rule if enabled else threefry._threefry2x32_cpu_lowering_rule
        mlir.register_lowering(threefry.threefry2x32_p, rule, platform="cpu")
    except (ImportError, AttributeError):
        return None
    return "threefry unrolled on CPU" if enabled else "threefry rolled on CPU (JAX's default)"

