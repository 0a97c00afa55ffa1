"""The house rule on imports: they run one way, data → encoder → diffusion → denoiser → hierarchy (which lays
its levels out in the denoiser's tokens) → the scripts (train, sample, evaluate, train_encoder, autoencoder) → reproduce, which
runs the scripts. No import runs upward, sideways or in a circle, and none hides inside a function."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RANK = {"data": 0, "encoder": 1, "diffusion": 2, "denoiser": 3, "hierarchy": 4,
        "train": 5, "sample": 5, "evaluate": 5, "train_encoder": 5, "autoencoder": 5, "reproduce": 6}


def project_imports(path):
    """(module imported, line, at the top level?) for every import of a project module in ``path``."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        found += [(n.split(".")[0], node.lineno, id(node) in top) for n in names if n.split(".")[0] in RANK]
    return found


def test_every_project_module_is_ranked():
    assert {p.stem for p in ROOT.glob("*.py")} == set(RANK)


def test_imports_run_one_way_and_at_the_top():
    wrong = []
    for name, rank in RANK.items():
        for imported, line, at_top in project_imports(ROOT / f"{name}.py"):
            if RANK[imported] >= rank:
                wrong.append(f"{name}.py:{line} imports {imported} (rank {RANK[imported]} >= {rank})")
            if not at_top:
                wrong.append(f"{name}.py:{line} imports {imported} inside a function")
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_an_upward_import(tmp_path):
    (tmp_path / "denoiser.py").write_text("import data\nfrom hierarchy import Level\n\ndef f():\n    import train\n")
    assert project_imports(tmp_path / "denoiser.py") == [("data", 1, True), ("hierarchy", 2, True), ("train", 5, False)]
    assert RANK["hierarchy"] >= RANK["denoiser"]  # so the second import is refused by the rule above
