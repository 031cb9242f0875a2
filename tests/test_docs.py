"""The design document the code cites is in the repository, with every cited section."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"),
           *[p for d in ("mythos_rt", "tests", "bench", "csrc", "triton_kernels", "graphs")
             for p in (ROOT / d).rglob("*") if p.suffix in (".py", ".md", ".cuh", ".cu", ".cpp")
             and p != pathlib.Path(__file__).resolve()]]


def test_citations_point_at_the_design_document_in_docs():
    design = (ROOT / "docs" / "design.md").read_text()
    headings = set(re.findall(r"^#+ (.+)$", design, flags=re.M))
    cited = 0
    for path in SOURCES:
        text = path.read_text(errors="replace")
        assert "DESIGN.md" not in text, f"{path} cites a design document outside the repository"
        for section in re.findall(r'docs/design\.md "([^"]+)"', text):
            assert section in headings, f"{path} cites missing section {section!r}"
            cited += 1
    assert cited >= 5
