"""A parity and latency matrix across many devices: plan the cells (model x precision x
target), build their bundles, let a CI system fan the cells out to device runners (or run
those this machine can with ``run``), and merge every device's results into one report.

    plan.py      cells, bundles, device commands, CI runner labels; the typed plan.json
    build.py     the bundles the cells need (convert, then bundle, on the host)
    run.py       the cells this machine can run, in child processes
    workflow.py  GitHub Actions and GitLab CI generated from a plan
    merge.py     results judged against the plan: missing, stale, repeated, re-checked
    render.py    Markdown, JUnit, JSON and offline HTML of the merged matrix
"""
