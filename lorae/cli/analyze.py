"""``lorae analyze``: diversity and weight-space analysis of a trained ensemble.

    lorae analyze --config run/config.yaml --ckpt_path run/checkpoints/best.ckpt --output_dir out

Builds the model and data module from the config (as ``lorae test`` does: a full checkpoint
holds every weight, so no pretrained weights are downloaded; an adapter-only checkpoint,
``model.checkpoint: adapters``, needs the pretrained backbone it was trained on), runs the
chosen split, and writes:

- ``analysis.json``: per-member and ensemble accuracy, the ensemble-size curve, the mean
  disagreement, Jensen-Shannon divergence (bits) and mutual information (nats), their
  pairwise matrices, the t-SNE coordinates, and per projection the weight-space numbers
  (:mod:`lorae.analysis.weights`) and the appendix E diversity score;
- ``weight_space.csv``: one row per projection (block.q/k/v/o) with the summary numbers;
- ``ensemble_size.csv``;
- figures (``--plots``, default when matplotlib is installed): ``disagreement.png``,
  ``jsd.png``, ``tsne.png`` (M >= 3), ``ensemble_size.png``, ``weight_similarity.png``
  (member-vs-member subspace similarity, mean over projections), ``pretrained_similarity.png``
  and ``delta_singular_values.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lorae.analysis.embedding import tsne_embedding
from lorae.analysis.weights import analyse_projection, diversity_score
from lorae.errors import ConfigError, DataNotFoundError
from lorae.evaluation.collect import collect_member_logits
from lorae.evaluation.figures import (
    ensemble_size_figure,
    heatmap_figure,
    matplotlib_available,
    require_pyplot,
    save_figure,
    scatter_figure,
    singular_values_figure,
)
from lorae.evaluation.report import write_table
from lorae.metrics.diversity import disagreement_matrix, jensen_shannon_matrix
from lorae.metrics.ensemble_size import first_k_log_probs
from lorae.metrics.functional import (
    expected_calibration_error,
    mutual_information,
    predictive_log_probs,
)

__all__ = ["analyze_logits", "analyze_weights", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorae analyze",
        description="Function-space diversity and weight-space analysis of a trained ensemble "
        "(paper section 4, appendices D and E). Extra --key=value options are passed to the "
        "config like in `lorae test`.",
    )
    parser.add_argument("--config", action="append", required=True, help="config file(s)")
    parser.add_argument("--ckpt_path", required=True, help="checkpoint to analyse")
    parser.add_argument("--output_dir", required=True, type=Path, help="where to write")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--max_samples", type=int, default=2000, help="samples to run")
    parser.add_argument("--top_k", type=int, default=8, help="singular vectors compared")
    parser.add_argument("--intruder_threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0, help="t-SNE random state")
    parser.add_argument(
        "--plots",
        choices=("auto", "true", "false"),
        default="auto",
        help="draw figures (auto: when matplotlib is installed)",
    )
    return parser


def analyze_logits(logits: Tensor, target: Tensor, seed: int = 0) -> dict[str, Any]:
    """Function-space numbers of member logits ``(M, N, C)`` with targets ``(N,)``."""
    num_members = logits.shape[0]
    log_probs = predictive_log_probs(logits)
    sizes = first_k_log_probs(logits)
    disagreement = disagreement_matrix(logits)
    jsd = jensen_shannon_matrix(logits)
    pairs = max(num_members * (num_members - 1), 1)
    result: dict[str, Any] = {
        "num_samples": int(target.shape[0]),
        "num_members": num_members,
        "accuracy": float((log_probs.argmax(-1) == target).double().mean()),
        "member_accuracy": (logits.argmax(-1) == target).double().mean(dim=1).tolist(),
        "ensemble_size": [
            {
                "k": k + 1,
                "acc": float((sizes[k].argmax(-1) == target).double().mean()),
                "ece": float(expected_calibration_error(sizes[k].exp(), target)),
            }
            for k in range(num_members)
        ],
        "disagreement": float(disagreement.sum() / pairs),
        "jsd_bits": float(jsd.sum() / pairs),
        "mutual_information_nats": float(mutual_information(logits).mean()),
        "disagreement_matrix": disagreement.tolist(),
        "jsd_matrix": jsd.tolist(),
    }
    if num_members >= 3:
        result["tsne"] = tsne_embedding(logits, seed=seed).tolist()
    return result


def analyze_weights(
    weights: dict[str, tuple[Tensor, Tensor]], top_k: int, threshold: float
) -> dict[str, Any]:
    """Weight-space numbers of every projection and the appendix E diversity score."""
    projections: dict[str, Any] = {}
    for key, (reference, members) in weights.items():
        report = analyse_projection(reference, members, top_k, threshold)
        projections[key] = {
            **report.summary(),
            "pretrained_similarity_per_member": report.pretrained_similarity.tolist(),
            "member_similarity_matrix": report.member_similarity.tolist(),
            "intruders_per_member": report.intruders.tolist(),
            "delta_singular_values": report.delta_singular_values[:, : 2 * top_k].tolist(),
        }
    result: dict[str, Any] = {"projections": projections}
    try:
        result["diversity_score_v"] = diversity_score(weights, "v")
    except ValueError as error:
        result["diversity_score_v"] = None
        result["diversity_score_note"] = str(error)
    return result


def _build(configs: list[str], ckpt_path: str, overrides: list[str]) -> tuple[Any, Any]:
    """The model (checkpoint loaded) and data module of a config, built like `lorae test`
    (through the one :func:`~lorae.cli.main.build_cli`)."""
    from lorae.checkpoints.safe import load_checkpoint_safely
    from lorae.cli.main import build_cli

    if not Path(ckpt_path).is_file():
        raise DataNotFoundError(f"Checkpoint '{ckpt_path}' does not exist.")
    args = [a for c in configs for a in ("--config", c)] + overrides
    cli = build_cli(args, run=False, load_from=ckpt_path, save_config=False)
    checkpoint = load_checkpoint_safely(ckpt_path)
    cli.model.on_load_checkpoint(checkpoint)  # identity check; fills an adapter-only one
    cli.model.load_state_dict(checkpoint["state_dict"])
    return cli.model, cli.datamodule


def _figures(result: dict[str, Any], out: Path) -> list[Path]:
    require_pyplot()
    written = []
    m = result["num_members"]
    labels = [str(i) for i in range(m)]
    written.append(
        save_figure(
            heatmap_figure(np.array(result["disagreement_matrix"]), "Pairwise disagreement rate"),
            out / "disagreement.png",
        )
    )
    written.append(
        save_figure(
            heatmap_figure(np.array(result["jsd_matrix"]), "Pairwise Jensen-Shannon div. (bits)"),
            out / "jsd.png",
        )
    )
    if "tsne" in result:
        figure = scatter_figure(np.array(result["tsne"]), labels, "t-SNE of member predictions")
        written.append(save_figure(figure, out / "tsne.png"))
    rows = result["ensemble_size"]
    series = {k: [r[k] for r in rows] for k in ("acc", "ece")}
    figure = ensemble_size_figure([r["k"] for r in rows], series)
    written.append(save_figure(figure, out / "ensemble_size.png"))
    projections = result.get("weights", {}).get("projections", {})
    if projections:
        mean_similarity = np.mean(
            [p["member_similarity_matrix"] for p in projections.values()], axis=0
        )
        figure = heatmap_figure(mean_similarity, "Member subspace similarity (mean over layers)")
        written.append(save_figure(figure, out / "weight_similarity.png"))
        plt = require_pyplot()
        figure, axes = plt.subplots(figsize=(max(4.0, 0.25 * len(projections)), 3.2))
        names = list(projections)
        values = [p["pretrained_similarity"] for p in projections.values()]
        axes.bar(range(len(names)), values, color="tab:blue")
        axes.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
        axes.set_ylim(0, 1.05)
        axes.set_ylabel("top-k similarity to pretrained")
        axes.set_title("Pretrained vs member singular subspace (mean over members)")
        written.append(save_figure(figure, out / "pretrained_similarity.png"))
        shown = names[-4:]  # the last block's projections
        figure = singular_values_figure(
            {k: np.array(projections[k]["delta_singular_values"]) for k in shown},
            "Singular values of the member updates W_i - W_0 (= B_i A_i for LoRA)",
        )
        written.append(save_figure(figure, out / "delta_singular_values.png"))
    return written


def main(argv: list[str]) -> int:
    """Entry point of ``lorae analyze``."""
    args, overrides = _parser().parse_known_args(argv)
    draw = matplotlib_available() if args.plots == "auto" else args.plots == "true"
    if draw:
        require_pyplot()  # fail before the (slow) model pass
    model, datamodule = _build(args.config, args.ckpt_path, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    datamodule.setup("test")
    loader = datamodule.val_dataloader() if args.split == "val" else datamodule.predict_dataloader()

    def to_device(batch: Any) -> Any:
        inputs, target = batch
        if isinstance(inputs, dict):
            return {k: v.to(device) for k, v in inputs.items()}, target
        return inputs.to(device), target

    logits, target = collect_member_logits(model, loader, to_device, args.max_samples)
    result = analyze_logits(logits, target, args.seed)
    result["split"] = args.split
    result["checkpoint"] = args.ckpt_path
    try:
        weights = model.method.member_weights()
    except ConfigError as error:
        result["weights_note"] = str(error)
    else:
        result["weights"] = analyze_weights(weights, args.top_k, args.intruder_threshold)
    out: Path = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result, indent=2) + "\n")
    written = [out / "analysis.json"]
    written += write_table(out / "ensemble_size", result["ensemble_size"])
    projections = result.get("weights", {}).get("projections", {})
    if projections:
        rows = [
            {"projection": k, **{n: v for n, v in p.items() if not isinstance(v, list)}}
            for k, p in projections.items()
        ]
        written += write_table(out / "weight_space", rows)
    if draw:
        written += _figures(result, out)
    print(
        f"{args.split}: {result['num_samples']} samples, accuracy {result['accuracy']:.4f}, "
        f"disagreement {result['disagreement']:.4f}, JSD {result['jsd_bits']:.4f} bits, "
        f"MI {result['mutual_information_nats']:.4f} nats"
    )
    if "weights" in result:
        print(f"appendix E diversity score (v): {result['weights']['diversity_score_v']}")
    print("Written: " + ", ".join(str(p) for p in written))
    return 0
