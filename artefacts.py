"""The files the scripts write and read, by name, and the one way they are written: atomically.

A reader (demo.py, compare.py, the sbatch scripts, a person) never sees half a file or half a run: single files go
to a temp file beside their target and are renamed; a run's outputs go to a staging dir and are moved in with the
completion marker last.
"""

import io
import json
import os
import shutil
import tempfile

TRAIN_RECORD = "train_config.yaml"  # train.py writes it last: its presence means the run finished
CHECKPOINT_STATE = "trainer_state.json"  # written last into a checkpoint: its presence means the checkpoint is whole
CHECKPOINTS_DIR = "checkpoints"
RESULTS_FILE = "evaluation_results.json"  # evaluate.py writes it last
MODEL_CARD = "README.md"  # the Hub shows it


def read_results(path, option=""):
    """evaluate.py's results dict from its output dir (or the json itself), with one-line errors naming the dir
    (and the option it came from)."""
    from cli import InputError  # cli imports transformers: not at the top, so the sbatch scripts read names fast

    file = path if path.endswith(".json") else os.path.join(path, RESULTS_FILE)
    where = f"{option} {path}" if option else path
    if not os.path.isfile(file):
        raise InputError(f"{where}: no {RESULTS_FILE} (run evaluate.py with --output_dir {path} first)")
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise InputError(f"{file}: not valid JSON ({error.msg})") from None


def write_atomic(path, data):
    """Write text or bytes to a temp file beside ``path``, then rename; the temp file is removed on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (a cluster node has no display): every figure's one set-up.
    Imported on first use, so the scripts that only read names (the sbatch scripts) stay fast."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, dpi=100):
    """A matplotlib figure as PNG at ``path``, atomically, and closed."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def publish(staging_dir, output_dir, last=None):
    """Move every entry of a finished staging dir into output_dir (entry ``last`` moved last), then remove it.

    A reader that waits for ``last`` (the completion marker) never sees a half-written result.
    """
    os.makedirs(output_dir, exist_ok=True)
    names = sorted(os.listdir(staging_dir), key=lambda name: name == last)
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        os.replace(os.path.join(staging_dir, name), target)
    shutil.rmtree(staging_dir, ignore_errors=True)
