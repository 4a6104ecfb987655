"""Build report.pdf from the notebooks: execute each one top to bottom, then
export them together through nbconvert's LaTeX route (xelatex).

    python tools/build_report.py            # full run: notebooks executed in place,
                                            # figures/ and report.pdf at the top level
    python tools/build_report.py --quick    # small subset, one epoch (a few minutes),
                                            # into build/quick/
    python tools/build_report.py --quick --out /tmp/r   # into another folder
    python tools/build_report.py --lanes 1  # one notebook at a time

The notebooks read three environment variables that this script sets:
CNN_QUICK ("1" for the quick mode), CNN_OUT (where runs/, figures/ go) and
CNN_PROGRESS ("0": no live progress bar, the notebooks keep the per-epoch lines; the PDF
shows one run's and folds those of a cell that trained several, ``fold_training_logs``);
with two lanes, each kernel also gets OPENBLAS_NUM_THREADS (unless it is set).
Training notebooks save weights and histories in <out>/runs/ and reuse them,
so an interrupted build resumes where it stopped. Cells tagged "hide-input"
show only their output in the PDF; cells tagged "remove-cell" are left out.

Figures and tables are numbered once across the whole PDF (``number_floats``):
every image output and every Markdown-table output of the executed notebooks
becomes a LaTeX figure or table with a caption, listed in the table of contents'
lists. The caption comes, in this order, from ``cnn_report.figure``/``table``
(output metadata), from a Markdown cell right after the cell that starts with
an italic "*Figure N: ...*" or "*Table: ...*" paragraph (its number is dropped:
LaTeX numbers), or else from the section heading above (and the build lists
those). Markdown cells refer to a labelled float as ``[figure](#label)``.
Output on stderr (warnings) is printed in the build log, never put in the PDF;
an error in a cell still stops the build.

On two or more cores the notebooks run in two lanes side by side (``stages``):
the two CIFAR-10 notebooks (``OWN_LANE``), which need no other
notebook's runs, in one, the others in order in the other, the summary after both; each kernel gets half the cores for
OpenBLAS (``--lanes 1``: one after the other, with every core).
"""
import argparse
import base64
import copy
import os
import re
import sys
import time
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import PDFExporter
from nbconvert.filters.pandoc import convert_pandoc
from traitlets.config import Config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from cnn_files import save_bytes  # noqa: E402

NOTEBOOKS = ROOT / "notebooks"


def execute(source, target, threads=None, running=None, failed=None):
    """Run the notebook at ``source`` in the notebooks folder, with at most ``threads``
    OpenBLAS threads (None: OpenBLAS's default, one per core); save it to ``target``.
    ``running``: a dict where the notebook's client is kept while it runs (``stop``);
    ``failed``: a ``threading.Event`` that, once set, stops it before its next cell."""
    nb = nbformat.read(source, as_version=4)
    env = dict(os.environ)
    if threads is not None:             # a user's own OPENBLAS_NUM_THREADS wins
        env.setdefault("OPENBLAS_NUM_THREADS", str(threads))

    def before_cell(cell, cell_index):  # the other lane failed while this kernel was starting
        if failed is not None and failed.is_set():
            raise RuntimeError(f"{source.name}: stopped because a notebook in the other lane failed")

    client = NotebookClient(nb, timeout=None, kernel_name="python3", on_cell_start=before_cell,
                            resources={"metadata": {"path": str(NOTEBOOKS)}})
    running = {} if running is None else running
    running[source] = client
    began = time.time()
    try:
        client.execute(env=env)
    finally:
        running.pop(source, None)
    save_bytes(target, nbformat.writes(nb).encode())
    print(f"  {source.name}: {time.time() - began:.0f} s", flush=True)
    return nb


def stop(client):
    """Kill the kernel of a notebook that is still running (its cell then fails)."""
    process = getattr(getattr(getattr(client, "km", None), "provisioner", None), "process", None)
    if process is not None:
        process.kill()


# The notebooks that need no other notebook's runs and so can run beside the rest
# (notebook 02 reads 01's model; the summary, the last notebook, reads every result),
# chosen so that the two lanes take about as long: the two CIFAR-10 notebooks (the 2-D
# CNN, 39 minutes from scratch on 2026-11-27, and the rows, 13) in one, the MNIST chapters
# (01-03, 49), the image folders and Fashion-MNIST (4) in the other: 51.3 and 53.8 minutes. Until
# 2026-11-27 the rows models were part of notebook 04, whose lane alone then took 64
# minutes, the other 50; from then until the CIFAR-10 recipe's 7 epochs Fashion-MNIST
# ran beside notebook 04 instead of the rows.
OWN_LANE = ("04_cifar10", "07_cifar10_rows")


def cores():
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def stages(sources, lanes):
    """The order in which to run the notebooks ``sources``: stages one after the other,
    each a list of lanes run side by side, each lane a list of notebooks run in order.
    Two ``lanes``: [[others, OWN_LANE ones], [summary]]; one: [[all but the summary], [summary]]."""
    *body, summary = sources
    own = [s for s in body if s.stem in OWN_LANE] if lanes > 1 else []
    first = [lane for lane in ([s for s in body if s not in own], own) if lane]
    return [stage for stage in (first, [[summary]]) if stage]


def execute_all(sources, target, lanes):
    """Execute every notebook in ``stages``; target(source) is where an executed
    notebook is saved. While two lanes run, each kernel gets half the cores for
    OpenBLAS. When a notebook fails, the other lane's running notebook is stopped
    and the first error is raised at once. Returns the executed notebooks in the
    order of ``sources``."""
    done, running, failed = {}, {}, threading.Event()

    def run(lane, threads):
        for source in lane:
            done[source] = execute(source, target(source), threads, running, failed)

    for stage in stages(sources, lanes):
        threads = max(1, cores() // len(stage)) if len(stage) > 1 else None
        with ThreadPoolExecutor(len(stage)) as pool:
            futures = [pool.submit(run, lane, threads) for lane in stage]
            try:
                for future in as_completed(futures):
                    future.result()                 # a lane's error, raised here
            except BaseException:                   # that, or Ctrl-C: stop the other lane too
                failed.set()
                for client in list(running.values()):
                    stop(client)
                raise
    return [done[s] for s in sources]


def latex_cell(text):
    """A raw cell whose LaTeX ``text`` nbconvert's LaTeX export passes through."""
    return nbformat.v4.new_raw_cell(text, metadata={"raw_mimetype": "text/latex", "format": "text/latex"})


def merge(notebooks, names=None):
    """One notebook holding every cell of ``notebooks`` in order, opened by a
    table of contents and lists of figures and tables. ``names`` (one per
    notebook, for the build log) are kept in each cell's metadata."""
    merged = copy.deepcopy(notebooks[0])
    merged.cells = []
    for k, nb in enumerate(notebooks):
        for cell in copy.deepcopy(nb.cells):
            cell.metadata["build_source"] = names[k] if names else f"notebook {k}"
            merged.cells.append(cell)
    merged.cells.insert(0, latex_cell(CONTENTS))
    merged.metadata["title"] = "A Convolutional Neural Network from Scratch in NumPy"
    merged.metadata["authors"] = [{"name": "cnn-numpy project"}]
    return merged


# Characters the report's fonts (Latin Modern, nbconvert's default under xelatex) have no glyph
# for: xelatex drops such a character with only a line in its log ("Missing character"), so each
# becomes an active character that typesets its LaTeX equivalent, in text, captions and code alike.
MISSING_GLYPHS = {"\u2248": "\\ensuremath{\\approx}",                  # ≈
                  "\u207b": "\\textsuperscript{\\textminus}"}          # ⁻ (as in 10⁻³)
# Non-ASCII characters the notebooks use that Latin Modern Roman and Mono both have (checked with
# fc-query): tests/test_report.py fails on any other, which must be checked and added, or mapped above.
FONT_HAS = set("×±→–…°·³−")

# After the title: the characters above defined, captions shown (nbconvert's template hides them),
# then the contents and the lists of figures and tables on their own page(s).
CONTENTS = ("".join(f"\\catcode`{ch}=\\active\\protected\\def{ch}{{{tex}}}\n" for ch, tex in MISSING_GLYPHS.items())
            + "\\captionsetup{format=plain, font=small, labelfont=bf, aboveskip=6pt, belowskip=4pt}\n"
            "\\tableofcontents\n\\listoffigures\n\\listoftables\n\\clearpage\n")

FLOAT_KEY = "cnn_report"           # cnn_report.FLOAT_KEY: the output metadata of R.figure / R.table
# "*Figure 3: text*", "*Table: text*", "*Table 1 and figure 3: text*" opening a Markdown cell
LEGACY_CAPTION = re.compile(r"\A\s*\*(?P<label>(?:figures?|tables?)(?:\s+\d+)?"
                            r"(?:\s+and\s+(?:figures?|tables?)(?:\s+\d+)?)?)\s*:\s*(?P<text>.+?)\s*\*\s*(?:\n\s*\n|\Z)",
                            re.IGNORECASE | re.DOTALL)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
REFERENCE = re.compile(r"\[(figure|table|Figure|Table)\]\(#([A-Za-z0-9_-]+)\)")


def _is_table(output):
    """A display output whose Markdown is a pipe table only (``cnn_report.markdown_table``)."""
    text = str(output.get("data", {}).get("text/markdown", "")).strip()
    lines = text.splitlines()
    return (len(lines) >= 2 and all(line.lstrip().startswith("|") for line in lines)
            and re.match(r"^\|?\s*:?-{3,}", lines[1].strip()) is not None)


def _float_kind(output):
    if output.get("output_type") not in ("display_data", "execute_result"):
        return None
    if "image/png" in output.get("data", {}):
        return "figure"
    return "table" if _is_table(output) else None


def _to_latex(markdown):
    """Markdown (a caption or a table) -> LaTeX through pandoc, as nbconvert does, on one line per paragraph."""
    return convert_pandoc(markdown, "markdown+tex_math_double_backslash", "latex",
                          extra_args=["--wrap=none", "--columns=1000"]).strip()


def _short(caption_latex):
    """The caption's first sentence, for the list of figures/tables (all of it when
    cutting would leave a bracket or brace open)."""
    for cut in [m.start() for m in re.finditer(r"[.:;](?=\s)", caption_latex)] + [len(caption_latex)]:
        first = caption_latex[:cut].rstrip(".")
        if all(first.count(a) == first.count(b) for a, b in ("()", "{}", "[]")):
            return first
    return caption_latex.rstrip(".")


def _caption_command(caption, label, kind):
    latex = _to_latex(caption)
    label = f"\\label{{{'fig' if kind == 'figure' else 'tab'}:{label}}}" if label else ""
    return f"\\caption[{{{_short(latex)}}}]{{{latex}}}{label}"


def table_latex(markdown, caption, label=None):
    """A Markdown pipe table as a non-floating-looking LaTeX table: ``[H]`` keeps it
    where it is in the text and a tabular cannot break across pages (pandoc's
    longtable can); wider than the text, it is scaled down to the text width."""
    body = _to_latex(markdown).splitlines()
    begin = next(i for i, line in enumerate(body) if line.startswith("\\begin{longtable}"))
    spec = re.match(r"\\begin\{longtable\}(?:\[[^\]]*\])?(\{.*\})\s*$", body[begin]).group(1)
    rows = body[begin + 1:body.index("\\end{longtable}")]
    if "\\endfirsthead" in rows:                        # the header repeated on later pages: not needed
        rows = rows[:rows.index("\\endfirsthead")] + rows[rows.index("\\endhead") + 1:]
    if "\\endhead" in rows:
        rows.remove("\\endhead")
    if "\\endlastfoot" in rows:                         # pandoc 3 puts the foot (\bottomrule) first
        end = rows.index("\\endlastfoot")
        foot = [r for r in rows[:end] if r.startswith("\\bottomrule")]
        rows = [r for r in rows[:end] if not r.startswith("\\bottomrule")] + rows[end + 1:] + foot
    rows = [r for r in rows if r not in ("\\endfoot",)]
    return "\n".join(["\\begin{table}[H]", "\\centering", _caption_command(caption, label, "table"),
                      "\\begin{adjustbox}{max width=\\linewidth}", f"\\begin{{tabular}}{spec}", *rows,
                      "\\end{tabular}", "\\end{adjustbox}", "\\end{table}"])


def figure_latex(filenames, caption, label=None):
    """One LaTeX figure of the PNG files ``filenames`` (stacked, each at most the text
    width and a share of the page height) with ``caption`` below."""
    height = 0.62 / len(filenames) if len(filenames) > 1 else 0.62
    images = [f"\\adjustimage{{max size={{\\linewidth}}{{{height:.2f}\\textheight}}}}{{{name}}}\\par"
              for name in filenames]
    return "\n".join(["\\begin{figure}[H]", "\\centering", *images,
                      _caption_command(caption, label, "figure"), "\\end{figure}"])


def _legacy_caption(cell):
    """(kinds, text, rest of the cell) when the Markdown ``cell`` opens with an italic
    "*Figure N: ...*" / "*Table: ...*" paragraph, else None."""
    match = LEGACY_CAPTION.match(cell.source)
    if not match:
        return None
    label = match.group("label").lower()
    kinds = {kind for kind in ("figure", "table") if kind in label}
    text = " ".join(match.group("text").split())
    return kinds, text[:1].upper() + text[1:], cell.source[match.end():]


def number_floats(nb):
    """Turn every figure and table output of the merged notebook ``nb`` into a
    captioned LaTeX float, in order (LaTeX numbers them: one numbering for the
    whole PDF); drop stderr outputs and the caption lines Jupyter shows; join each
    cell's printed lines into one output and fold the epoch logs of several runs
    (``fold_training_logs``).

    Returns (notebook, resources, log): a new notebook whose float outputs carry
    ``text/latex`` (preferred by nbconvert's LaTeX export; the PNG moves into
    ``resources["outputs"]``), and lines for the build log (each stderr output
    and each float that had no caption of its own).
    """
    nb = copy.deepcopy(nb)
    resources, log, labels = {"outputs": {}}, [], {}
    counts = {"figure": 0, "table": 0}
    heading = ""
    pending = []                  # floats of the last code cell that still wait for a caption
    for index, cell in enumerate(nb.cells):
        source = cell.metadata.get("build_source", "")
        if cell.cell_type == "markdown":
            legacy, chosen = _legacy_caption(cell), []
            if legacy and pending:
                kinds, text, rest = legacy
                chosen = [f for f in pending if f["kind"] in kinds]
                for f in chosen:
                    f["caption"] = text
                pending = []
            if legacy and chosen:
                cell.source = rest
            elif legacy:                              # nothing to attach to: keep the words, drop the number
                cell.source = f"*{legacy[1]}*\n\n{legacy[2]}"
            found = HEADING.findall(cell.source)
            heading = found[-1] if found else heading
            continue
        if cell.cell_type != "code":
            continue
        for f in pending:                           # the previous cell's floats got no caption
            f["caption"] = None
        outputs, groups, shown = [], [], []
        for output in cell.get("outputs", []):     # stderr first, so that stdout around a warning joins up
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                text = "".join(output.get("text", "")).strip()
                log.append(f"stderr of {source} cell {index} (not in the PDF): {text[:500]}")
            else:
                shown.append(output)
        for output in _merge_streams(shown):
            meta = output.get("metadata", {}).get(FLOAT_KEY, {})
            if output.get("output_type") == "stream":
                output["text"] = fold_training_logs(output["text"], source)     # one string: merged
            if meta.get("caption_text"):
                continue
            kind = _float_kind(output)
            if kind is None:
                outputs.append(output)
                continue
            if kind == "figure" and not meta and groups and groups[-1]["kind"] == "figure" \
                    and not groups[-1]["explicit"] and groups[-1]["outputs"][-1] is (outputs[-1] if outputs else None):
                groups[-1]["outputs"].append(output)   # consecutive plain images of one cell: one figure
            else:
                groups.append({"kind": kind, "outputs": [output], "explicit": bool(meta),
                               "caption": meta.get("caption"), "label": meta.get("label"),
                               "source": source, "cell": index, "heading": heading})
            outputs.append(output)
        cell.outputs = outputs
        pending = [g for g in groups if g["caption"] is None]
        cell.metadata["build_floats"] = groups
    for cell in nb.cells:
        for g in cell.metadata.pop("build_floats", []):
            counts[g["kind"]] += 1
            number = counts[g["kind"]]
            if g["label"]:
                labels[g["label"]] = f"{number}"
            caption = g["caption"]
            if caption is None:
                caption = (g["heading"] or g["source"]).rstrip(".") + "."
                log.append(f"{g['kind']} {number} ({g['source']} cell {g['cell']}) has no caption; "
                           f"using the heading: {caption}")
            if g["kind"] == "table":
                latex = table_latex(g["outputs"][0]["data"]["text/markdown"], caption, g["label"])
                g["outputs"][0]["data"] = {"text/latex": latex, "text/plain": ""}
                continue
            names = []
            for k, output in enumerate(g["outputs"]):
                name = f"figure-{number}-{k}.png"
                resources["outputs"][name] = base64.b64decode(output["data"]["image/png"])
                names.append(name)
                output["data"] = {"text/latex": "", "text/plain": ""}
            g["outputs"][-1]["data"]["text/latex"] = figure_latex(names, caption, g["label"])
    cells = []
    for cell in nb.cells:                          # "[figure](#label)" -> "figure 7"
        cells.append(cell)
        if cell.cell_type == "markdown":
            cell.source = REFERENCE.sub(lambda m: _reference(m, labels, log), cell.source)
            # pandoc makes a table in the text an uncaptioned longtable, which still
            # steps LaTeX's table counter: step it back so the numbering has no gap
            tables = _to_latex(cell.source).count("\\begin{longtable}") if "|" in cell.source else 0
            if tables:
                cells.append(latex_cell(f"\\addtocounter{{table}}{{-{tables}}}"))
    nb.cells = cells
    return nb, resources, log


def _merge_streams(outputs):
    """A new list of the outputs in which each run of consecutive stream outputs of one
    name is one output (a copy) with its text as one string: a log printed line by line
    arrives as one output per line. The outputs themselves are not changed."""
    merged = []
    for output in outputs:
        if output.get("output_type") != "stream":
            merged.append(output)
        elif merged and merged[-1].get("output_type") == "stream" and merged[-1].get("name") == output.get("name"):
            merged[-1]["text"] += "".join(output.get("text", ""))
        else:
            merged.append(copy.copy(output))         # a NotebookNode still: nbconvert reads output.text
            merged[-1]["text"] = "".join(output.get("text", ""))
    return merged


# One line of cnn_train.fit's log: "epoch 3/9: loss 0.1222, acc 0.9630, ... (8.0 s)".
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+): ")


def fold_training_logs(text, source):
    """A cell's printed ``text`` for the PDF: when it logs the epochs of several runs (a
    study's dozens of runs fill pages), their epoch lines become one line saying how many
    there were and where they are; the executed notebook keeps them all. One run's log
    (a few lines, with each epoch's time) stays as it is."""
    lines = text.splitlines(keepends=True)
    epochs = [i for i, line in enumerate(lines) if EPOCH_LINE.match(line)]
    counts = [tuple(int(n) for n in EPOCH_LINE.match(lines[i]).groups()) for i in epochs]   # (epoch, of)
    # a run starts wherever the count does not go on (a resumed run starts past epoch 1)
    runs = sum(k == 0 or (epoch, total) != (counts[k - 1][0] + 1, counts[k - 1][1])
               for k, (epoch, total) in enumerate(counts))
    if runs < 2:
        return text
    note = f"[the training log of {runs} runs, {len(epochs)} epoch lines: in notebooks/{source}.ipynb]\n"
    skip = set(epochs)
    kept = [line for i, line in enumerate(lines) if i not in skip]
    return "".join(kept[:epochs[0]] + [note] + kept[epochs[0]:])


def _reference(match, labels, log):
    word, label = match.groups()
    if label not in labels:
        log.append(f"reference to an unknown label #{label}: left as the bare word")
        return word
    return f"{word} {labels[label]}"


def export_pdf(nb, target, resources=None):
    config = Config()
    config.TagRemovePreprocessor.enabled = True
    config.TagRemovePreprocessor.remove_input_tags = {"hide-input"}
    config.TagRemovePreprocessor.remove_cell_tags = {"remove-cell"}
    config.PDFExporter.latex_command = ["xelatex", "-interaction=nonstopmode", "{filename}"]
    # Raw LaTeX cells (the table of contents) pass through; the PDF exporter's default lists only PDF.
    config.PDFExporter.raw_mimetypes = ["text/latex", "application/pdf"]
    pdf, _ = PDFExporter(config=config).from_notebook_node(nb, resources=resources)
    save_bytes(target, pdf)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small subset, one epoch")
    parser.add_argument("--out", type=Path, default=None,
                        help="write notebooks, runs/, figures/ and report.pdf here (default: the repository)")
    parser.add_argument("--lanes", type=int, choices=(1, 2), default=2 if cores() >= 2 else 1,
                        help="notebooks side by side (default: 2 on two or more cores)")
    args = parser.parse_args(argv)
    # A quick run never overwrites the committed notebooks, figures or report.
    out = (args.out or (ROOT / "build" / "quick" if args.quick else ROOT)).resolve()
    os.environ["CNN_QUICK"] = "1" if args.quick else "0"
    os.environ["CNN_OUT"] = str(out)
    os.environ["CNN_PROGRESS"] = "0"
    sources = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))
    if not sources:
        sys.exit(f"no notebooks found in {NOTEBOOKS}")
    began = time.time()
    print(f"executing {len(sources)} notebooks ({'quick' if args.quick else 'full'} mode, "
          f"{args.lanes} lane{'s' if args.lanes > 1 else ''}) into {out}", flush=True)
    executed = execute_all(sources, lambda src: src if out == ROOT else out / "notebooks" / src.name, args.lanes)
    merged, resources, log = number_floats(merge(executed, [src.stem for src in sources]))
    for line in log:
        print("  note:", line)
    export_pdf(merged, out / "report.pdf", resources)
    print(f"wrote {out / 'report.pdf'} in {time.time() - began:.0f} s")


if __name__ == "__main__":
    main()
