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
    """Parse flags for `experiment` and train it; `--config=path.py:preset` picks a preset."""
    name = experiment_name(experiment)
    _check_override_keys(sys.argv[1:], experiment.__file__)
    flags.DEFINE_string("workdir", os.path.join("workdirs", name),
                        "Run directory: config.json, metrics.jsonl, checkpoints, pictures. "
                        "Re-running with the same workdir resumes the run.")
    config_flags.DEFINE_config_file(
        "config", default=experiment.__file__, lock_config=True,
        help_string=f"Config file (default: {name}'s own get_config); add :preset to choose a preset.")
    app.run(functools.partial(_run, experiment))


def _load_config(argv: list[str], default_path: str):
    """The config the flags will be applied to: `--config=path[:preset]` or the experiment's own."""
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), default_path)
    path, _, preset = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("jaxml_config_file", path)
    if module_spec is None or not os.path.exists(path):
        sys.exit(f"error: --config={spec}: no config file at {path!r}")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(preset) if preset else module.get_config()


def _check_override_keys(argv: list[str], default_path: str) -> None:
    """A mistyped `--config.a.b=...` fails here with the valid keys, before JAX starts."""
    overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
    if not overrides:
        return
    config = _load_config(argv, default_path)
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
    from jaxml.train import loop

    if FLAGS.config.eval.kfold:
        from jaxml.train import selection

        selection.cross_validate(experiment, FLAGS.config, FLAGS.workdir)
        return
    try:
        result = loop.train(experiment, FLAGS.config, FLAGS.workdir)
    except loop.NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if result.preempted:
        print(f"preempted at step {result.step}; re-run the same command to resume", flush=True)
        return
    summary = "  ".join(f"{k} {v:.4f}" for k, v in {**result.train_metrics, **result.eval_metrics}.items())
    print(f"done: step {result.step}  {summary}\nworkdir: {os.path.abspath(FLAGS.workdir)}", flush=True)
