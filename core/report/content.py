"""What the report says, in order, built once as blocks (:mod:`core.report.blocks`).

The report opens with the table across models (the seed report's columns, held out, with
intervals and controls), the comparison with the seed report and any explanation a number
needs; then the summary, one section per model, the methodology, the limitations and how to
reproduce the run. :mod:`core.report.markdown` and :mod:`core.report.html` render these blocks.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

from core.metrics import finite
from core.report.blocks import (BREAK, Block, Bullets, Chart, CodeBlock, Document, Facts, Heading, Paragraph, Table,
                                code, plain, strong)
from core.report.facts import entry_facts, organism_rows, patching_summary
from core.report.numbers import rate_text, seconds
from core.report.prose import limitations, methodology, summary_items
from core.report.seed import ablation_notes, frozen_block_notes, seed_comparison
from core.report.tables import (CONTROL_HEAD, CRITICAL_HEADER, CRITICAL_RULE, GENERATION_HEAD, LAYER_HEAD, SAMPLE_HEAD,
                                SEED_HEAD, SWEEP_HEAD, control_rows, critical_rows, generation_groups, layer_rows,
                                sample_rows, seed_rows, sweep_rows)

TITLE = "Refusal Circuit Analysis"
TABLE_NOTE = ("Rates: refusal rate [Wilson 95 % interval] (refusals/n) on held-out test prompts. Separation: held-out "
              "Cohen's d along the train direction at the chosen layer. Probe: k-fold cross-validated accuracy ± std on "
              "the train prompts. Controls: the worst of the random directions of equal norm (highest refusal when "
              "forcing, lowest when suppressing) and the label-shuffled direction; \"specific\" = the interval lies "
              "beyond every control's. KL: first response token on harmless test prompts (random direction beside "
              "it), then per token over the clean model's own answers.")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "model"


def machine_text(results: Mapping[str, Any]) -> str:
    m = results.get("machine") or {}
    return f"{m.get('platform', '?')}, {m.get('cpu_count', '?')} CPUs, device {m.get('device', 'cpu')}"


def runtime_text(results: Mapping[str, Any]) -> str:
    text = seconds(results.get("total_seconds"))
    if finite(results.get("total_cpu_seconds")):
        text += f" wall, {results['total_cpu_seconds']:.0f} CPU-seconds"
    text += f" on {machine_text(results)}"
    m = results.get("machine") or {}
    load, cpus = m.get("load_average"), m.get("cpu_count") or 1
    if load and load[0] > cpus:
        text += f" (load average {load[0]:.1f} on {cpus} CPUs at the end: the machine was shared, which inflates wall time)"
    return text


def config_yaml(results: Mapping[str, Any]) -> str:
    from core.config import dump_yaml

    return dump_yaml(results.get("config") or {}).replace("```", "'''").rstrip()


def opening(results: Mapping[str, Any]) -> list[Block]:
    """The title block, then the table across models and what it needs said beside it."""
    out: list[Block] = [
        Heading(1, results.get("title", TITLE)),
        Paragraph([strong("Generated:"), plain(f" {results.get('date', '?')}"), BREAK,
                   strong("Run time:"), plain(f" {runtime_text(results)}"), BREAK,
                   strong("Reproduce:"), plain(" "), code(results.get("command", ""))]),
    ]
    if results.get("models_pending"):
        out.append(Paragraph([strong("Partial run:"), plain(f" {len(results.get('models', []))} model(s) done; still to run: "
                                                            f"{', '.join(results['models_pending'])}.")], style="callout"))
    out += [Heading(2, "Results across models"), Table(SEED_HEAD, seed_rows(results)), Paragraph([plain(TABLE_NOTE)], "note"),
            Heading(3, "Compared with the seed report"), Bullets([[plain(s)] for s in seed_comparison(results)])]
    notes = ablation_notes(results)
    if notes:
        out += [Heading(3, "Large ablation cost, explained"), Bullets([[plain(n)] for n in notes])]
    frozen = frozen_block_notes(results)
    if frozen:
        out += [Heading(3, "Organism rows at a frozen layer"), Bullets([[plain(n)] for n in frozen])]
    return out


def model_section(e: Mapping[str, Any]) -> list[Block]:
    """Everything about one model: facts, per-layer numbers, steering, controls, generations,
    patching and the organism card."""
    name = str(e.get("name", "?"))
    out: list[Block] = [Heading(2, name, anchor=slug(name)), Facts(entry_facts(e)),
                        *(Paragraph([strong("Note:"), plain(f" {n}")], "note") for n in e.get("notes") or [])]
    out += [Heading(3, "Per-layer separation and probe accuracy"),
            Chart(name, "layers", "per-layer separation and probe accuracy", required=True),
            Chart(name, "scan", "layer screen"), Chart(name, "grid", "position × layer selection grid"),
            Table(LAYER_HEAD, layer_rows(e), summary="Per-layer numbers")]
    out += [Heading(3, "Steering against controls"), Chart(name, "steering", "steering sweep", required=True),
            Table(SWEEP_HEAD, sweep_rows(e))]
    supp = e.get("suppress_refusal") or {}
    if supp:
        out.append(Paragraph([plain(f"Directional ablation on harmful prompts: {rate_text(supp)}; random direction "
                                    f"{rate_text(supp.get('random_control'))}; baseline "
                                    f"{rate_text((e.get('baseline') or {}).get('harmful_refusal'))}.")]))
    if control_rows(e):
        out += [Heading(3, "Controls of the headline interventions"), Table(CONTROL_HEAD, control_rows(e))]
    if e.get("generations"):
        groups = generation_groups(e)
        out += [Heading(3, f"Every generation and its label ({len(e['generations'])})"),
                Paragraph([plain("One section per condition (open one to read it; the browser's find filters by label). "
                                 "results.json holds the same rows.")], "note", only="html"),
                *(Table(GENERATION_HEAD, rows, wide_cols=(2, 3), summary=title, only="html") for title, rows in groups),
                Paragraph([plain("Counts per condition; report.html and results.json list every generation with its label.")],
                          "note", only="markdown"),
                Bullets([[plain(title)] for title, _ in groups], only="markdown")]
    if e.get("samples"):
        out += [Heading(3, "Sample generations"), Table(SAMPLE_HEAD, sample_rows(e), wide_cols=(0, 2, 3))]
    if e.get("patching"):
        out += patching_section(name, e["patching"])
    if e.get("organism"):
        out += [Heading(3, "Organism card"), Facts(organism_rows(e["organism"]))]
    return out


def patching_section(name: str, p: Mapping[str, Any]) -> list[Block]:
    out: list[Block] = [Heading(3, "Activation patching"), *(Paragraph([plain(x)]) for x in patching_summary(p)),
                        Chart(name, "patching", "residual patching heatmap"),
                        Chart(name, "components", "attention vs MLP patching"),
                        Chart(name, "heads", "per-head patching")]
    crit = critical_rows(p)
    if crit:
        out += [Paragraph([plain(f"Critical components ({CRITICAL_RULE}), strongest first:")]), Table(CRITICAL_HEADER, crit)]
    else:
        out.append(Paragraph([plain(f"No critical components: no cell passes ({CRITICAL_RULE}) at this number of pairs.")]))
    return out


def closing(results: Mapping[str, Any]) -> list[Block]:
    """Methodology, limitations and how to reproduce the run."""
    out: list[Block] = [Heading(2, "Methodology")]
    out += [Paragraph([strong(f"{head}."), plain(" "), *spans]) for head, spans in methodology(results)]
    out += [Heading(2, "Limitations"), Bullets(limitations(results))]
    out += [Heading(2, "Reproducibility"), CodeBlock(f"make setup\n{results.get('command', '')}", "bash"),
            Facts([("Versions", ", ".join(f"{k} {v}" for k, v in (results.get("versions") or {}).items())),
                   ("Machine", machine_text(results)),
                   ("Prompts", str((results.get("prompts") or {}).get("description", "?")))]),
            CodeBlock(config_yaml(results), "yaml", summary="Config (YAML)")]
    return out


def build_report(results: Mapping[str, Any]) -> Document:
    """The whole report as blocks, in reading order."""
    doc = Document(str(results.get("title", TITLE)))
    doc.add(*opening(results))
    doc.add(Heading(2, "Summary"), Bullets(summary_items(results)))
    for e in results.get("models", []):
        doc.add(*model_section(e))
    doc.add(*closing(results))
    return doc
