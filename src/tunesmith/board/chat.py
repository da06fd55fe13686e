"""Chat with a finished run from the board, streaming, as `tunesmith chat` does.

The run's own train_config.yaml says everything: the base model, the adapters merged under it, the
template it trained with, the sampling keys. The model loaded is the one `tunesmith train` pointed
do_predict at (training/run.trained_model_config). One model is kept loaded (the last one asked for),
so flipping between runs costs a load but memory stays bounded; generation runs on a worker thread
and its text pieces reach the response as they are decoded.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from pathlib import Path

from tunesmith.board.runs import RunFolders, run_status
from tunesmith.errors import TunesmithError
from tunesmith.training.run_files import CONFIG_FILE

END = object()


class Chats:
    """One loaded engine at a time, for the runs under the board's root."""

    def __init__(self, folders: RunFolders) -> None:
        self.folders, self.loaded, self.lock = folders, (None, None), threading.Lock()

    def engine(self, folder: Path):
        """The chat engine of the run in `folder` (loaded on first use, replacing the previous one)."""
        from tunesmith.inference.engine import Engine
        from tunesmith.training.configure import load_config
        from tunesmith.training.run import trained_model_config

        if self.loaded[0] != folder:
            self.loaded = (None, None)  # the old model goes before the new one loads
            config = trained_model_config(load_config(folder / CONFIG_FILE))
            self.loaded = (folder, Engine.load(config))
        return self.loaded[1]

    def stream(self, name: str, messages: list[dict]) -> Iterator[str]:
        """The answer to `messages`, piece by piece as the model writes it; bad input fails here, before
        any text is sent (NotARun for a name that is no run under the root)."""
        from tunesmith.inference.chat import fit_history, stream_answer
        from tunesmith.inference.engine import check_messages

        check_messages(messages)
        folder = self.folders.resolve(name)
        if run_status(folder)["status"] != "finished":
            raise TunesmithError(f"run {name} has not finished; chat with a finished run.")
        pieces: queue.Queue = queue.Queue()

        class Pieces:  # the file-like `stream_answer` writes to
            def write(self, text: str) -> None:
                pieces.put(text)

            def flush(self) -> None:
                pass

        def work() -> None:
            try:
                with self.lock:  # one generation at a time on the one loaded model
                    engine = self.engine(folder)
                    stream_answer(engine, fit_history(engine, messages), Pieces())
            except Exception as error:  # shown in the chat, not lost in a server log
                pieces.put(f"\n[error: {error}]")
            finally:
                pieces.put(END)

        threading.Thread(target=work, daemon=True).start()
        return iter(pieces.get, END)
