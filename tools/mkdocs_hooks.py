"""MkDocs hooks for lars_tf's documentation site (``mkdocs.yml``: ``hooks``).

- The benchmark results page is ``benchmarks/RESULTS.md`` itself, with its plots
  (``benchmarks/results/*.png``), added to the site at build time: the figures have one
  home, which ``make bench`` rewrites.
- Tables that mirror code are generated from it where a page says
  ``<!-- generated: NAME -->`` (``presets``, ``callbacks``), so they cannot go stale.
- A link to a file of the repository that is not a page (``tools/patches/...``,
  ``launch/slurm.sbatch``) must name a file that exists, or the build fails naming the page
  and the link; it is rendered as the path (or a link to it under ``repo_url``, when the
  site sets one). ``benchmarks/RESULTS.md`` links go to the results page.
"""

from __future__ import annotations

import os
import re

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
RESULTS = "benchmarks/RESULTS.md"
_LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s#]+)(#[^)\s]*)?\)")


def on_files(files, config):
    """Add the results page and its plots."""
    files.append(File.generated(config, "results.md",
                                abs_src_path=os.path.join(ROOT, RESULTS)))
    plots = os.path.join(ROOT, "benchmarks", "results")
    for name in sorted(os.listdir(plots)):
        if name.endswith(".png"):
            files.append(File.generated(config, f"results/{name}",
                                        abs_src_path=os.path.join(plots, name)))
    return files


def _presets() -> str:
    from lars_tf.presets import PRESETS

    rows = ["| `--preset` | global batch | epochs | peak lr | warmup epochs | warmup from | "
            "weight decay | end lr |", "|---|---|---|---|---|---|---|---|"]
    for name, p in PRESETS.items():
        v = p.values
        rows.append(f"| `{name}` | {v['global_batch_size']} | {v['epochs']} | "
                    f"{v['learning_rate']:g} | {v['warmup_epochs']:g} | "
                    f"{v.get('warmup_start_learning_rate', 0.0):g} | {v['weight_decay']:g} | "
                    f"{v.get('end_learning_rate', 0.0):g} |")
    return "\n".join(rows)


def _callbacks() -> str:
    import inspect

    import lars_tf.callbacks as callbacks

    rows = ["| `lars_tf.callbacks.` | what it does |", "|---|---|"]
    for name in callbacks.__all__:
        cls = getattr(callbacks, name)
        if not issubclass(cls, callbacks.tf.keras.callbacks.Callback):
            continue
        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        doc = " ".join(inspect.getdoc(cls).split("\n\n")[0].split()).replace("|", "\\|")
        rows.append(f"| `{name}({', '.join(params)})` | {doc} |")
    return "\n".join(rows)


GENERATED = {"presets": _presets, "callbacks": _callbacks}


def on_page_markdown(markdown, page, config, files):
    def generated(m):
        name = m.group(1)
        if name not in GENERATED:
            raise PluginError(f"{page.file.src_uri}: no generated table {name!r}")
        return GENERATED[name]()

    markdown = re.sub(r"<!-- generated: (\w+) -->", generated, markdown)
    if page.file.src_uri == "results.md":
        return markdown
    here = os.path.dirname(page.file.src_uri)

    def link(m):
        text, target, anchor = m.group(1), m.group(2), m.group(3) or ""
        if re.match(r"^[a-z]+:", target):  # a URL
            return m.group(0)
        if files.get_file_from_path(os.path.normpath(os.path.join(here, target))):
            return m.group(0)  # a page of the site: MkDocs checks it
        if target == RESULTS:
            return f"[{text}]({os.path.relpath('results.md', here or '.')}{anchor})"
        if not os.path.exists(os.path.join(ROOT, target)):
            raise PluginError(f"{page.file.src_uri}: the link [{text}]({target}) names "
                              "neither a page nor a file of the repository")
        repo = config.get("repo_url")
        if repo:
            return f"[{text}]({repo.rstrip('/')}/blob/main/{target})"
        return text if text.strip("`") == target else f"{text} (`{target}`)"

    return _LINK.sub(link, markdown)
