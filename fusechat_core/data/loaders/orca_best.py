from fusechat_core.data.conversation import LOADERS, MalformedRow, field, text


@LOADERS.register("orca_best")
def load_orca_best(row: dict) -> list[tuple[str, str]]:
    """shahules786/orca-best: one row per cluster of similar Orca (GPT-4) instructions.

    ``{"instruction": <system prompt>, "cluster": {"samples": [{"input": ..., "output": ...}, ...]},
    "num_samples": n, ...}``. The system prompt becomes a system turn (dropped by
    ``normalise`` like every system turn: each model's chat template supplies its own).

    Every sample of the cluster is kept, in its stored order, as one exchange (input →
    human, output → gpt), so a row is one multi-turn conversation. Why all of them: the
    paper's 20,000 orca-best examples are 20,000 rows, and a row is the cluster, not one
    of its samples; picking one sample per row (as some readers do, at random) would
    throw away most of each row's GPT-4 answers and make the result depend on an
    unseeded choice. Long clusters are cut at exchange boundaries like any long
    conversation. A sample without a text input and output makes the whole row
    malformed (``bad_cluster_sample``), so nothing is dropped silently.
    An early revision named the column ``conversation``; it is read the same way.
    """
    cluster = field(row, "cluster", "conversation")
    if not isinstance(cluster, dict):
        raise MalformedRow("cluster_not_an_object")
    samples = cluster.get("samples")
    if not isinstance(samples, list) or not samples:
        raise MalformedRow("no_cluster_samples")
    turns: list[tuple[str, str]] = []
    system = row.get("instruction")
    if isinstance(system, str) and system.strip():
        turns.append(("system", system))
    for sample in samples:
        if not isinstance(sample, dict) or not isinstance(sample.get("input"), str) \
                or not isinstance(sample.get("output"), str):
            raise MalformedRow("bad_cluster_sample")
        turns += [("human", text(sample["input"])), ("gpt", text(sample["output"]))]
    return turns
