"""docs/training.md's table of config keys is generated from bcpc.config.TrainConfig; regenerate
with ``UPDATE_DOCS=1 python -m pytest tests/test_training_doc.py``."""
import os
import re
from pathlib import Path

from bcpc import config

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"
START, END = "<!-- keys:start -->\n", "<!-- keys:end -->\n"


def test_the_key_table_is_current():
    text = DOC.read_text()
    head, rest = text.split(START)
    _, tail = rest.split(END)
    fresh = head + START + config.keys_table() + END + tail
    if os.environ.get("UPDATE_DOCS"):
        DOC.write_text(fresh)
    assert DOC.read_text() == fresh, "docs/training.md is stale: UPDATE_DOCS=1 python -m pytest tests/test_training_doc.py"


def test_every_config_the_page_names_exists_and_loads():
    text = DOC.read_text()
    names = set(re.findall(r"configs/[\w/]+\.yaml", text))
    assert names
    for name in names:
        config.load(Path(__file__).resolve().parents[1] / name)
