"""Renders the Grafana dashboard's panels to one PNG from the dashboard's own queries, asked of
a Prometheus that scrapes a running service (the picture in the chart README).

    python scripts/dashboard-picture.py PROMETHEUS_URL OUTPUT.png [MINUTES]

Reads helm/ecr-image-service/files/dashboard.json, runs every panel's queries through
Prometheus's range-query API (/api/v1/query_range) over the last MINUTES (default 10), and
draws each panel as a small line chart titled as in Grafana. Needs matplotlib
(scripts/dashboard-picture-requirements.txt, pinned).
"""

import json
import pathlib
import sys
import time
import urllib.parse
import urllib.request

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent


def query_range(base, expr, start, end, step):
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{base}/api/v1/query_range?{params}", timeout=30) as answer:
        return json.load(answer)["data"]["result"]


def legend(template, metric):
    text = template
    for key, value in metric.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def main(base, output, minutes=10):
    dashboard = json.loads((ROOT / "helm/ecr-image-service/files/dashboard.json").read_text())
    panels = dashboard["panels"]
    end = time.time()
    start = end - 60 * minutes
    step = max(1, int(60 * minutes / 120))
    rows = (len(panels) + 1) // 2
    figure, axes = plt.subplots(rows, 2, figsize=(14, 3 * rows), squeeze=False)
    for axis, panel in zip(axes.flat, panels):
        for target in panel["targets"]:
            for series in query_range(base, target["expr"], start, end, step):
                points = [(float(t) - end, float(v)) for t, v in series["values"] if v != "NaN"]
                if points:
                    xs, ys = zip(*points)
                    axis.plot([x / 60 for x in xs], ys,
                              label=legend(target.get("legendFormat", ""), series["metric"]))
        axis.set_title(panel["title"], fontsize=9)
        axis.tick_params(labelsize=7)
        axis.set_xlabel("minutes", fontsize=7)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6, loc="upper left")
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    figure.suptitle(dashboard["title"])
    figure.tight_layout()
    figure.savefig(output, dpi=80)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(m) for m in sys.argv[3:]))
