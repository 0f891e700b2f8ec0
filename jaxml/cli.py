"""The absl entry point behind `python -m experiments.<name> [--config...] [--workdir=DIR]`."""

import functools
import importlib.util
import os
import sys
import types

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS


def experiment_name(experiment: types.ModuleType) -> str:
    """`cnn` for experiments.cnn, also when run as __main__ via `python -m`."""
    spec = experiment.__spec__
    return (spec.name if spec is not None else experiment.__name__).rsplit(".", 1)[-1]


def main(experiment: types.ModuleType) -> None:
    """Parse flags for `experiment` and train it.

    `--config=path.py[:preset]` runs a config file (Python: it is code, so only run files
    you trust); `--config=run.json` a JSON config, e.g. another run's `config.json`, which
    is data and is checked key by key against the experiment's own config.
    """
    name = experiment_name(experiment)
    argv = sys.argv[1:]
    _check_override_keys(argv, experiment)
    flags.DEFINE_string("workdir", os.path.join("workdirs", name),
                        "Run directory: config.json, metrics.jsonl, checkpoints, pictures. "
                        "Re-running with the same workdir resumes the run.")
    _define_launch_flags()
    spec = _config_spec(argv)
    if spec is not None and spec.endswith(".json"):
        # The JSON file is not a flag value config_flags can parse: drop it from argv before
        # the overrides (--config.a.b=...) are registered from argv.
        sys.argv = [sys.argv[0]] + [a for a in argv if not a.startswith("--config=")]
        config_flags.DEFINE_config_dict("config", load_json_config(spec, experiment.get_config()), lock_config=True)
    else:
        config_flags.DEFINE_config_file(
            "config", default=experiment.__file__, lock_config=True,
            help_string=f"Config file (default: {name}'s own get_config); add :preset to choose a preset, "
                        "or give a .json config.")
    app.run(functools.partial(_run, experiment))


def _define_launch_flags() -> None:
    """Multi-host, compilation cache and preflight flags (launch/README.md)."""
    flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                      "jax.distributed.initialize(): auto = when flags below or a launcher's environment "
                      "(JAX_COORDINATOR_ADDRESS, SLURM with several tasks, TPU_WORKER_HOSTNAMES) say this "
                      "is one of several processes; true = always (TPU VM slices: JAX asks the metadata server).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator (multi-process runs).")
    flags.DEFINE_integer("num_processes", None, "How many processes the run has (multi-process runs).")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    flags.DEFINE_bool("compile_cache", True, "Keep compiled XLA programs on disk so a re-run skips compiling.")
    flags.DEFINE_string("compile_cache_dir", None,
                        "Where compiled programs are kept: default $JAX_COMPILATION_CACHE_DIR, else "
                        "$JAXML_CACHE_DIR, else ~/.cache/jaxml/xla.")
    flags.DEFINE_bool("keep_host_memory", True, "Let glibc's malloc keep freed memory (one arena, no mmap, no "
                      "trimming) so XLA:CPU's per-step temporaries are not page-faulted in again every step "
                      "(jaxml.runtime.keep_host_memory; RSS stays at its high-water mark).")
    flags.DEFINE_bool("multithreaded_convolutions", True, "Run XLA:CPU's convolutions on all cores (Eigen) where "
                      "the installed jaxlib runs each on one thread (YNNPACK in jaxlib 0.10; "
                      "jaxml.runtime.multithreaded_convolutions).")
    flags.DEFINE_integer("cpu_devices", 1, "Run the host CPU as this many XLA devices, the batch sharded over "
                         "them (data parallel); above 1 convolutions stay on YNNPACK's one thread per device. "
                         "Faster on jaxlib 0.10 for the convolution-heavy U-Net and ResNet-20 (0.65-0.90x on 2 "
                         "cores), slower for the LSTM, ViT and ResNet-50 (jaxml.runtime.cpu_devices).")
    flags.DEFINE_bool("unrolled_threefry", True, "Lower jax.random's threefry hash on CPU without its rolled "
                      "loop, as on GPU/TPU: the same random bits, fewer tiny kernels per step "
                      "(jaxml.runtime.unrolled_threefry).")
    flags.DEFINE_bool("preflight", False, "Compile the train step for --topology without that hardware, print "
                      "per-device memory, FLOPs per step and compile time, and exit.")
    flags.DEFINE_string("topology", "cpu:8", "Target of --preflight, e.g. v5e-16, v4-32, 8xH100, cpu:8.")


def _start_jax(experiment: types.ModuleType) -> bool:
    """The host allocator, multi-host init and the compilation cache, before anything starts a JAX backend;
    True when this is a preflight run (which has already printed its figures)."""
    from jaxml import runtime

    runtime.keep_host_memory(FLAGS.keep_host_memory)
    try:
        runtime.cpu_devices(FLAGS.cpu_devices)
    except ValueError as e:
        sys.exit(f"error: --cpu_devices: {e}")
    # Split into devices, each program's convolutions run best on YNNPACK's one thread (see cpu_devices).
    runtime.multithreaded_convolutions(FLAGS.multithreaded_convolutions and FLAGS.cpu_devices == 1)
    runtime.unrolled_threefry(FLAGS.unrolled_threefry)
    if FLAGS.preflight:
        from jaxml import preflight

        try:
            target = preflight.parse_topology(FLAGS.topology)
        except ValueError as e:
            sys.exit(f"error: {e}")
        preflight.prepare(target)
    else:
        try:
            how = runtime.initialize_distributed(FLAGS.distributed, FLAGS.coordinator_address,
                                                 FLAGS.num_processes, FLAGS.process_id)
        except ValueError as e:
            sys.exit(f"error: {e}")
        if how is not None:
            import jax

            logging.warning("jax.distributed initialised (%s): process %d of %d, %d local / %d global devices",
                            how, jax.process_index(), jax.process_count(), jax.local_device_count(),
                            jax.device_count())
    runtime.enable_compile_cache(FLAGS.compile_cache, FLAGS.compile_cache_dir)
    return FLAGS.preflight


def _config_spec(argv: list[str]) -> str | None:
    return next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)


def load_json_config(path: str, reference: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`reference` (the experiment's defaults) with every value from the JSON file at `path`;
    a key the reference does not have is an error naming it."""
    import json

    try:
        with open(path) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        sys.exit(f"error: --config={path}: cannot read a JSON config ({type(e).__name__}: {e})")
    config = ml_collections.ConfigDict(reference.to_dict())  # unlocked copy, types kept

    def merge(node, values, where):
        for key, value in values.items():
            if key not in node:
                sys.exit(f"error: --config={path}: unknown key {where + key!r}; valid keys of "
                         f"{where.rstrip('.') or 'the config'}: {', '.join(sorted(node.keys()))}")
            if isinstance(node[key], ml_collections.ConfigDict):
                merge(node[key], value, f"{where}{key}.")
            else:
                # JSON has no tuples; the defaults say where a list should be one.
                node[key] = _tuples(value) if isinstance(node[key], tuple) else value

    merge(config, values, "")
    return config


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _load_config(argv: list[str], experiment: types.ModuleType):
    """The config the flags will be applied to: `--config=...` or the experiment's own."""
    spec = _config_spec(argv) or experiment.__file__
    if spec.endswith(".json"):
        return load_json_config(spec, experiment.get_config())
    path, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("jaxml_config_file", path)
    if module_spec is None or not os.path.exists(path):
        sys.exit(f"error: --config={spec}: no config file at {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def _check_override_keys(argv: list[str], experiment: types.ModuleType) -> None:
    """A mistyped `--config.a.b=...` fails here with the valid keys, before JAX starts."""
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not overrides:
        return
    config = _load_config(argv, experiment)
    for key in overrides:
        node, walked = config, []
        for part in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                where = ".".join(walked) or "the config"
                valid = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                sys.exit(f"error: unknown config key --config.{key}: {where!r} has no key {part!r}. "
                         f"Valid keys of {where}: {', '.join(valid)}")
            node, walked = node[part], walked + [part]


def _run(experiment: types.ModuleType, argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}: use --config.key=value and --workdir=DIR")
    if not FLAGS["verbosity"].present:
        # Orbax and grain log every save at INFO; the progress line is what a user wants to
        # see. --verbosity=0 brings the INFO lines back.
        logging.set_verbosity(logging.WARNING)
    # Imported here so `--help` and flag errors come before JAX starts.
    from jaxml import config as config_lib
    from jaxml.train import loop
    from jaxml.train.checkpoint import CheckpointRestoreError, CheckpointSaveError, IncompatibleCheckpointError

    preflight = _start_jax(experiment)
    try:
        config_lib.validate(FLAGS.config)  # bad values are a one-line error, before anything compiles
    except ValueError as e:
        sys.exit(f"error: {e}")
    if preflight:
        from jaxml import preflight as preflight_lib

        try:
            preflight_lib.run(experiment, FLAGS.config, FLAGS.topology)
        except ValueError as e:  # a mesh or batch size that does not fit the target
            sys.exit(f"error: {e}")
        return

    if FLAGS.config.eval.kfold:
        from jaxml.train import selection

        selection.cross_validate(experiment, FLAGS.config, FLAGS.workdir)
        return
    try:
        result = loop.train(experiment, FLAGS.config, FLAGS.workdir)
    except (loop.NonFiniteError, CheckpointSaveError, CheckpointRestoreError, IncompatibleCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if result.preempted:
        print(f"preempted at step {result.step}; re-run the same command to resume", flush=True)
        return
    summary = "  ".join(f"{k} {v:.4f}" for k, v in {**result.train_metrics, **result.eval_metrics}.items())
    import jax

    if jax.process_index() == 0:  # a multi-host run's workers print nothing twice
        print(f"done: step {result.step}  {summary}\nworkdir: {os.path.abspath(FLAGS.workdir)}", flush=True)
