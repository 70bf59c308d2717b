"""docs/ops.md lists every registered rule and spelling; regenerate with
``UPDATE_DOCS=1 python -m pytest tests/test_ops_table.py``."""
import os
from pathlib import Path

from bcpc import registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "ops.md"
HEADER = """# Supported ops

Every op bcpc has a bound rule for, and every way of writing it that reaches the rule (module,
function, tensor method). Generated from the rule table (`bcpc.registry.ops_table()`);
`tests/test_ops_table.py` keeps this page in sync. An op that is not here and depends on the input
is refused at compile time, with the node, the source line and what to write instead; the
reasons for the deliberate refusals (LayerNorm, softmax, attention products, ...) are in
[soundness.md](soundness.md). To add one, see [adding-a-rule.md](adding-a-rule.md).

"""


def test_ops_page_matches_the_registry():
    text = HEADER + registry.ops_table()
    if os.environ.get("UPDATE_DOCS"):
        DOC.write_text(text)
    assert DOC.read_text() == text, "docs/ops.md is stale: UPDATE_DOCS=1 python -m pytest tests/test_ops_table.py"

