"""Training entry point (absl flags + ml_collections config files).

    python -m unclip_jax.main --config=experiments/decoder.py:test --workdir=DIR --config.optim.lr=1e-4
    python -m unclip_jax.main --config=experiments/decoder.py:test --workdir=DIR --mode=export [--export_dir=OUT]
    unclip train --config=... --workdir=...          # the same, through the `unclip` command

``--mode=train`` (default) trains, resuming from the newest checkpoint of ``DIR/checkpoints`` that verifies;
``--mode=export`` writes the EMA params of that checkpoint as a params-only native
folder (:func:`unclip_jax.convert.native.load_native` reads it). An unknown config field,
a value of the wrong type or out of its domain (:mod:`unclip_jax.train.validate`), a mesh that does not divide the
devices, a work directory another run holds (:mod:`unclip_jax.train.lock`) or a resume with a config that differs
from the checkpointed one (``--allow_config_change=FIELD,...`` when meant) is a one-line error naming it, exit 2;
``UNCLIP_TRACEBACK=1`` shows the traceback. SIGTERM and Ctrl-C (SIGINT) save a checkpoint and exit 143 / 130. Multi-host: set ``--config.distributed.coordinator_address=HOST:PORT``,
``--config.distributed.num_processes=N`` and ``--config.distributed.process_id=I`` (or
``--config.distributed.auto=True`` on TPU pods / SLURM) on every process.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys

# TensorFlow (clu's summary writer, tensorflow-datasets) is only a data/metrics dependency here: keep its start-up
# chatter out of training logs unless the user asks for it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from absl import flags
from ml_collections import config_flags

from unclip_jax.logs import quiet_accelerator_probe


def make_flags(argv: list[str]) -> flags.FlagValues:
    """A fresh flag set; ml_collections registers the ``--config.<field>`` overrides from ``argv``."""
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config",
        None,
        "experiment file, e.g. experiments/decoder.py:test",
        flag_values=fv,
        lock_config=True,
        sys_argv=argv,
    )
    flags.DEFINE_string("workdir", None, "checkpoints, metrics, previews and exports go here", flag_values=fv)
    flags.DEFINE_enum(
        "mode", "train", ["train", "export"], "train, or export the latest checkpoint's EMA params", flag_values=fv
    )
    flags.DEFINE_string(
        "export_dir", None, "--mode=export: output folder (default WORKDIR/export/ema_<step>)", flag_values=fv
    )
    flags.DEFINE_list(
        "allow_config_change",
        [],
        "resume although these fields differ from the checkpointed config (beyond those that may always change)",
        flag_values=fv,
    )
    return fv


EXIT_PREEMPTED = 143  # 128 + SIGTERM: the run saved a checkpoint and should be restarted
EXIT_INTERRUPTED = 130  # 128 + SIGINT (Ctrl-C): likewise


def _setup_logging() -> None:
    from unclip_jax.logs import setup_logging

    setup_logging()


def _explain(error: Exception, argv: list[str]) -> str:
    """Names the ``--config.<field>`` override an error is about (ml_collections reports only the key)."""
    text = str(error).replace("\\n", " ").replace("\n", " ").replace("\\'", "'").strip()
    spec = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
    if spec and ("No such file" in text or "Failed loading config file" in text):
        return f"--config={spec}: no experiment file {spec.split(':', 1)[0]!r} (e.g. experiments/prior.py:test)"
    if text.startswith("'") and text.endswith("'") and text.count("'") > 2:
        text = text[1:-1]
    conversion = any(s in text for s in ("could not convert", "invalid literal", "flag --config"))
    m = re.search(r"'([A-Za-z_][\w]*)'", text)
    if m and not conversion:
        for arg in argv:
            path = arg[2:].split("=", 1)[0] if arg.startswith("--config.") else ""
            if m.group(1) in path.split(".")[1:]:
                return f"{arg}: unknown field {path!r} ({text})"
    return text


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` (argv[0] is the program name) and runs; returns the exit code.

    Returns 0 when training finished, 143 / 130 when it stopped on SIGTERM / SIGINT after saving a
    checkpoint, 2 on a usage error (one line; ``UNCLIP_TRACEBACK=1`` re-raises), 1 on a non-finite loss.
    """
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__.strip() + "\n\nflags:\n" + make_flags(argv[:1]).get_help())
        print("  --config.<field>=value: override any field of the experiment's config (an unknown field is an error)")
        return 0
    try:
        FLAGS = make_flags(argv)
        FLAGS(argv)
        config = FLAGS.config
        if config is not None:
            config.to_dict()  # a config file that failed to load raises on first use
    except (flags.Error, KeyError, TypeError, ValueError, AttributeError, OSError, flags.UnparsedFlagAccessError) as e:
        if os.environ.get("UNCLIP_TRACEBACK"):
            raise
        print(f"{argv[0] if argv else 'unclip_jax.main'}: {_explain(e, argv)}", file=sys.stderr)
        return 2
    if config is None or FLAGS.workdir is None:
        print(
            "usage: --config=experiments/<stage>.py:<variant> --workdir=DIR [--config.<field>=value ...]",
            file=sys.stderr,
        )
        return 2
    _setup_logging()
    quiet_accelerator_probe()
    logging.getLogger("unclip_jax.train").info(
        "%s %s in %s: loading JAX, the data pipeline and the model ...",
        FLAGS.mode,
        next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), "?"),
        FLAGS.workdir,
    )

    from unclip_jax import parallel
    from unclip_jax.train import lock, validate

    try:
        validate.validate_config(config)
        parallel.initialize_distributed(config.distributed)
        from unclip_jax.train import loop

        if FLAGS.mode == "export":
            print(loop.export_from_checkpoint(config, FLAGS.workdir, FLAGS.export_dir))
            return 0
        result = loop.train_and_evaluate(config, FLAGS.workdir, allow_changes=tuple(FLAGS.allow_config_change))
    except KeyboardInterrupt:
        print(f"{argv[0]}: interrupted; the steps since the last checkpoint are not saved", file=sys.stderr)
        return EXIT_INTERRUPTED
    except parallel.MeshError as e:
        print(f"{argv[0]}: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, KeyError, ValueError, lock.WorkdirLocked, PermissionError) as e:
        # Bad input (an empty or wrong data folder, a missing stats / codec file): the message names it. Set
        # UNCLIP_TRACEBACK=1 to see where it was raised.
        if os.environ.get("UNCLIP_TRACEBACK"):
            raise
        print(f"{argv[0]}: error: {e} (UNCLIP_TRACEBACK=1 shows the traceback)", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # metrics.NonFiniteLossError
        logging.getLogger("unclip_jax.train").error("%s", e)
        return 1
    if not result.preempted:
        return 0
    return EXIT_INTERRUPTED if result.signum == signal.SIGINT else EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
