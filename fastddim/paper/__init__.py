"""The DDIM paper's Tables 1 and 2 and its figures, remade on the MNIST model (``fastddim eval``).

    fastddim eval -n 256 --steps 10 --eta 0                          # one setting: FD to held-out digits
    fastddim eval --table1 --table2 --figures --out paper_eval/      # paper_tables.md, .json and PNGs

The quality metric is ``fastddim.metrics.fd_to_heldout``: the FID formula in the feature space
of a small MNIST classifier trained by the project. It is NOT Inception FID and its values are
not comparable to the paper's CIFAR-10 FIDs; only the orderings (over eta and S) are.

- Table 1: the metric for S in {10, 20, 50, 100} x eta in {0, 0.2, 0.5, 1, sigma_hat}, spacing
  "quad" (as the paper's CIFAR-10 numbers), ``n`` samples per cell, mean +- std over seeds.
  Every cell of one seed starts from the same x_T (common random numbers), so differences
  between cells are less noisy than the per-cell spread suggests.
- Table 2: per-dimension MSE (images in [-1, 1]) of held-out digits encoded with
  ``fastddim.invert`` and decoded with ``fastddim.sample`` at the same S (spacing "uniform",
  eta 0), for S in {10, 20, 50, 100, 200, 500, 1000}, next to the paper's CIFAR-10 column.
- Figures: one x_T decoded with S = 10, 20, 50, 100; an interpolation grid; reconstructions;
  plots of both tables.

Modules: ``measure`` (sampling and metrics), ``tables`` (the tables as data), ``figures``
(matplotlib, imported only when drawing), ``results`` (the raw results as JSON), ``report``
(the markdown, rendered from the JSON), ``run`` (the ``evaluate`` driver).

Python: ``fastddim.paper.evaluate(model, table1=True, n=128, seeds=2, out="paper_eval")`` returns
the numbers as a dict and writes the same report and JSON as the CLI.
"""
from .measure import fd_of_setting, heldout_subset, reconstruction_errors
from .run import DEFAULT_OUT, evaluate
from .tables import PAPER_TABLE1, PAPER_TABLE2, TABLE1_ETAS, TABLE1_STEPS, TABLE2_STEPS, single_summary

__all__ = [
    "evaluate", "single_summary", "fd_of_setting", "reconstruction_errors", "heldout_subset",
    "DEFAULT_OUT", "TABLE1_STEPS", "TABLE1_ETAS", "TABLE2_STEPS", "PAPER_TABLE1", "PAPER_TABLE2",
]
