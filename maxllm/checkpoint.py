"""Orbax checkpoints: the train state (params, optimizer state, step, RNG) and the
resolved config, saved together, asynchronously, on a cadence.

Orbax writes each step into a temporary directory and renames it once every file
is on disk, so a step directory without the temporary suffix is complete; on gs://,
which cannot rename a directory, it writes the step directory in place and adds
`commit_success.txt` last. A save cut short (a killed process, a preempted host)
leaves a step that is not finalized: it is skipped with a warning and removed, and
the run resumes from the newest complete step.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from maxllm import storage
from maxllm.config import CheckpointConfig, ConfigError

log = logging.getLogger(__name__)


class CheckpointMismatch(ConfigError):
    """The newest checkpoint's tree does not match the state the config builds."""


class CheckpointUnreadable(ConfigError):
    """No checkpoint in the directory can be read (each was set aside as damaged)."""


class CheckpointWriteFailed(ConfigError):
    """A save did not complete (a full disk, a lost bucket): the step was never
    finalized, its partial files are removed, the previous steps are untouched."""


class Checkpointer:
    def __init__(
        self,
        directory: str,
        cfg: CheckpointConfig,
        config_dict: dict[str, Any],
        extra_handlers: dict[str, Any] | None = None,
    ):
        """`extra_handlers`: more items saved beside the state (the data iterator's)."""
        # Orbax (tensorstore) wants absolute local paths.
        self.directory = epath.Path(directory if "://" in directory else Path(directory).absolute())
        if storage.is_remote(directory):
            storage.check_bucket(directory)
        self.cfg = cfg
        self.config_dict = config_dict
        self._warn_unfinished()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.max_to_keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=cfg.async_save,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers={**_handlers(), **(extra_handlers or {})})
        self._writing: int | None = None  # the step of the save in flight
        self._failed = False

    def _warn_unfinished(self) -> None:
        for child in _unfinished_steps(self.directory):
            log.warning(
                "skipping unfinished checkpoint %s (a save that did not complete); "
                "resuming from the newest complete step instead",
                child,
            )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The state saved at `step`, laid out like `abstract_state` (shapes, shardings)."""
        self._check_params(step, abstract_state["params"])
        self._check_tree(step, abstract_state)
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        return restored["state"]

    def restore_newest(self, abstract_state: Any) -> tuple[int, Any]:
        """(step, state) of the newest step that restores. A step whose files are
        truncated or corrupt is set aside as `<step>.corrupt` (renamed, nothing
        deleted) with a warning naming it and the error, and the next older step
        is tried; when none restores, an error names them all."""
        failed = []
        while (step := self.latest_step()) is not None:
            try:
                return step, self.restore(step, abstract_state)
            except ConfigError:
                raise
            except Exception as e:  # tensorstore and Orbax raise many kinds for a damaged file
                reason = _first_line(e)
                aside = self._set_aside(step)
                log.warning("checkpoint %s/%d cannot be read (%s); moved it to %s and resuming from the "
                            "previous checkpoint", self.directory, step, reason, aside)
                failed.append(f"{step} ({reason})")
        raise CheckpointUnreadable(f"no checkpoint in {self.directory} can be read: {'; '.join(failed)}; "
                                 "the damaged steps were renamed <step>.corrupt")

    def _set_aside(self, step: int) -> epath.Path:
        source = self.directory / str(step)
        target = self.directory / f"{step}.corrupt"
        n = 1
        while target.exists():
            n += 1
            target = self.directory / f"{step}.corrupt{n}"
        source.rename(target)
        self.manager.reload()
        return target

    def _check_tree(self, step: int, abstract_state: Any) -> None:
        """The saved state has the leaves the config's state has (the optimizer's
        structure changes with, e.g., train.clip_grad_norm): a mismatch is a config
        error, never mistaken for a damaged checkpoint."""
        saved = {_names(p) for p, _ in _flat(self.manager.item_metadata(step)["state"])}
        wanted = {_names(p) for p, _ in _flat(abstract_state)}
        if saved != wanted:
            show = lambda paths: ", ".join("/".join(p) for p in sorted(paths)[:4]) or "none"  # noqa: E731
            raise CheckpointMismatch(
                f"{self.directory}/{step}: the saved train state has other leaves than this config's (only saved: "
                f"{show(saved - wanted)}; only in the config: {show(wanted - saved)}); resume with the config it "
                "was saved with, or set run.output_dir to a new directory")

    def _check_params(self, step: int, abstract_params: Any) -> None:
        """Compares saved parameter names and shapes with the config's before reading."""
        saved_meta = self.manager.item_metadata(step)["state"]["params"]
        saved = {tuple(str(k.key) for k in p): tuple(x.shape) for p, x in _flat(saved_meta)}
        check_param_shapes(f"{self.directory}/{step}", saved, abstract_params,
                           hint="resume with the config it was saved with, or set run.output_dir to a new directory")

    def has_optimizer_state(self, step: int) -> bool:
        """False for a parameters-only checkpoint (what maxllm.import_hf writes)."""
        return self.has_state_key(step, "opt_state")

    def has_state_key(self, step: int, key: str) -> bool:
        return key in self.manager.item_metadata(step)["state"]

    def has_item(self, step: int, name: str) -> bool:
        return (self.directory / str(step) / name).exists()

    def read_item(self, step: int, name: str, args: Any) -> Any:
        """One extra item of the checkpoint at `step`, read with its restore `args`."""
        return self.manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]

    def save(self, step: int, state: Any, force: bool = False, extra: dict[str, Any] | None = None) -> bool:
        """Starts a save of `state` (and the `extra` items' save args) at `step`, in
        the background when async; all items land in one step directory together.
        A save that fails (here, or in the background and seen at the next save or
        wait) raises CheckpointWriteFailed naming the step and the cause."""
        with self._writes(step):
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    config=ocp.args.JsonSave(self.config_dict),
                    **(extra or {}),
                ),
                force=force,
            )

    def should_save(self, step: int) -> bool:
        return step % self.cfg.every_steps == 0

    def wait(self) -> None:
        with self._writes(None):
            self.manager.wait_until_finished()

    def close(self) -> None:
        """Waits for the save in flight and releases Orbax's threads; after a failed
        save only releases them (the error was raised already)."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failed save's error is the one to report
                if not self._failed:
                    raise

    @contextlib.contextmanager
    def _writes(self, step: int | None):
        try:
            yield
        except ConfigError:
            raise
        except Exception as e:  # tensorstore and Orbax raise many kinds for a failed write
            self._failed = True
            failed = self._writing if self._writing is not None else step
            self._stop_writers()
            removed = self._remove_partial()
            raise CheckpointWriteFailed(self._write_error(failed, e, removed)) from e
        # An async save goes on in the background: its failure surfaces at the next
        # save or wait, and names this step.
        self._writing = step if step is not None and self.cfg.async_save else None

    def _stop_writers(self) -> None:
        """After a failed write, lets Orbax's other writes of the step end (each
        fails or completes) and stops its threads, so nothing writes into the
        unfinished step once it is removed."""
        for finish in (self.manager.wait_until_finished, self.manager.close):
            try:
                finish()
            except Exception:  # noqa: BLE001 - the first failure is the one reported
                pass

    def _remove_partial(self) -> list[str]:
        """Deletes the unfinalized step directories a failed save left (on process 0;
        Orbax removes any left over at the next start), freeing their space."""
        if jax.process_index() != 0:
            return []
        removed = _unfinished_steps(self.directory)
        for child in removed:
            child.rmtree()
        return [child.name for child in removed]

    def _write_error(self, step: int | None, error: Exception, removed: list[str]) -> str:
        cause = _first_line(error)
        intact = max(_finalized_steps(self.directory), default=None)
        where = f"{self.directory}/{step}" if step is not None else str(self.directory)
        message = f"writing checkpoint {where} failed: {cause}. "
        if "No space left on device" in str(error) or "os_error_code='28'" in str(error):
            size = _size(self.directory / str(intact)) if intact is not None else None
            message += ("The disk is full" + (f" (a checkpoint of this run takes {size / 1e6:.1f} MB)" if size else "")
                        + ". ")
        message += (f"The unfinished step was never finalized and its files were deleted ({', '.join(removed)}; "
                    "anything a write still in flight adds is removed at the next start); " if removed
                    else "Nothing of the step was finalized; ")
        message += (f"checkpoint step {intact} is intact: free space (or set run.output_dir / checkpoint.dir elsewhere, "
                    "or lower checkpoint.max_to_keep) and run the same command to resume from it"
                    if intact is not None else "no earlier checkpoint exists: free space and run the same command again")
        return message


def _finalized_steps(root: epath.Path) -> list[int]:
    """The steps under `root` whose saves completed, in order (read from the
    directory, not from a CheckpointManager's cached listing)."""
    if not root.exists():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit() and ocp.path.step.is_path_finalized(p))


def _unfinished_steps(root: epath.Path) -> list[epath.Path]:
    """The step directories under `root` of saves that never completed."""
    if not root.exists():
        return []
    return sorted((p for p in root.iterdir() if p.name[:1].isdigit() and ocp.path.step.is_path_temporary(p)),
                  key=lambda p: p.name)


def _first_line(error: Exception) -> str:
    """The error's type and the first line of its message, shortened; for a failed
    write, from the OS error on (tensorstore puts the file and errno there)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if (at := text.find("Failed writing")) > 0:
        text = text[at:]
    return f"{type(error).__name__}: {text[:400]}"


def _size(path: epath.Path) -> int | None:
    """Bytes under a local directory; None on a remote one."""
    if storage.is_remote(str(path)) or not path.exists():
        return None
    return sum(f.stat().st_size for f in Path(str(path)).rglob("*") if f.is_file())


def checkpoint_dir(output_dir: str, cfg: CheckpointConfig) -> str:
    """`checkpoint.dir`, or `<output_dir>/checkpoints`; local or gs://."""
    return cfg.dir or output_dir.rstrip("/") + "/checkpoints"


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {"state": ocp.StandardCheckpointHandler(), "config": ocp.JsonCheckpointHandler()}


def _flat(tree: Any) -> list:
    return jax.tree_util.tree_flatten_with_path(tree)[0]


def _names(path: tuple) -> tuple[str, ...]:
    """A tree path as names, the same for a dict key, a field and an index (Orbax's
    metadata turns an optimizer's named tuples into dicts)."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


class StateReader:
    """Reads parts of one saved train state without restoring all of it: single
    parameter leaves (for export, one at a time) or the parameters alone (to start
    training from them). Works on the checkpoints training writes and on the
    parameters-only checkpoints `maxllm.import_hf` writes."""

    def __init__(self, directory: str, step: int | None = None):
        root = epath.Path(directory if "://" in directory else Path(directory).absolute())
        if step is None:
            steps = _finalized_steps(root)
            if not steps:
                raise ConfigError(f"{root}: no complete checkpoint")
            step = steps[-1]
        self.step = step
        self.path = root / str(step) / "state"
        if not self.path.exists():
            raise ConfigError(f"{self.path}: checkpoint step {step} not found")
        self._ckptr = ocp.PyTreeCheckpointer()
        self.tree = ocp.PyTreeCheckpointHandler().metadata(self.path).tree  # (the step-level read warns)

    def has_optimizer_state(self) -> bool:
        return "opt_state" in self.tree

    def param_shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
        return {tuple(str(k.key) for k in path): tuple(x.shape) for path, x in _flat(self.tree["params"])}

    def leaf(self, path: tuple[str, ...], dtype: Any = None) -> Any:
        """One parameter as a numpy array (cast to `dtype` while reading)."""
        meta = self.tree["params"]
        for key in path:
            meta = meta[key]
        item = restore = None
        for key in reversed(("params", *path)):
            item = {key: item if item is not None else jax.ShapeDtypeStruct(meta.shape, meta.dtype)}
            restore = {key: restore if restore is not None else ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype)}
        out = self._ckptr.restore(self.path, args=ocp.args.PyTreeRestore(item=item, restore_args=restore, partial_restore=True))
        for key in ("params", *path):
            out = out[key]
        return out

    def params(self, abstract_params: Any) -> Any:
        """All parameters, laid out like `abstract_params` (shapes, shardings)."""
        check_param_shapes(f"{self.path}", self.param_shapes(), abstract_params)
        item = {"params": abstract_params}
        out = self._ckptr.restore(self.path, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
        return out["params"]


def check_param_shapes(where: str, saved: dict[tuple[str, ...], tuple[int, ...]], abstract_params: Any,
                       hint: str | None = None) -> None:
    """Raises CheckpointMismatch naming the parameters whose names or shapes differ."""
    wanted = {tuple(str(k.key) for k in p): tuple(x.shape) for p, x in _flat(abstract_params)}
    if saved == wanted:
        return
    diffs = [
        f"{'/'.join(k)}: saved {saved.get(k, 'absent')}, config {wanted.get(k, 'absent')}"
        for k in sorted(set(saved) | set(wanted))
        if saved.get(k) != wanted.get(k)
    ]
    raise CheckpointMismatch(
        f"{where}: the parameters do not fit this config ({'; '.join(diffs[:3])}"
        f"{'; ...' if len(diffs) > 3 else ''})" + (f"; {hint}" if hint else "")
    )
