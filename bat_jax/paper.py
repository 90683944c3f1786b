"""The paper's reported numbers, as data: every table ``bat_jax.reproduce`` can rerun.

Each row is one method at one eps (and, for the appendix's step-schedule
tables, one checkpoint: the final model or the early-stopped "(ES)" one),
with the reported accuracy in % as (mean, std over 3 seeds) or (value, None)
where the paper gives no std. Transcribed from Kim, Lee, Lee, Lee (2021),
"Bridged Adversarial Training", Tables 1, 2, 3, B.1, B.2, B.3.
"""

import dataclasses
from typing import Dict, Optional, Tuple

Cell = Tuple[float, Optional[float]]  # (mean %, std %) ; std None: not reported
COLUMNS = ("clean", "fgsm", "pgd", "autoattack")
NORM = "linf"  # every table's threat model: L-inf balls of the row's eps


@dataclasses.dataclass(frozen=True)
class Row:
  method: str
  eps: float
  values: Dict[str, Cell]  # column -> cell
  checkpoint: str = "last"  # 'last' (final model) or 'best' (early-stopped "(ES)")
  beta: Optional[float] = None  # when the row names one (Table B.2's "BAT (beta = 10)")


@dataclasses.dataclass(frozen=True)
class Table:
  name: str
  title: str
  config: str  # the file in configs/ that holds the table's settings
  config_arg: str  # its argument besides eps (e.g. "schedule=step")
  eps_arg: str  # how the file takes eps: "fraction" (MNIST) or "per255"
  rows: Tuple[Row, ...]
  note: str = ""
  pgd_step_size: float = 2 / 255  # the evaluation's PGD^50 step (0.01 on MNIST)


def _rows(eps, checkpoint="last", **by_method):
  out = []
  for method, cells in by_method.items():
    beta = None
    if "_beta" in method:
      method, beta = method.split("_beta")[0], float(method.split("_beta")[1])
    values = {c: v for c, v in zip(COLUMNS, cells) if v is not None}
    out.append(Row(method, eps, values, checkpoint, beta))
  return out


def _mnist_rows(eps, at, trades, mart, bat):
  return _rows(eps, at=(at[0], None, *at[1:]), trades=(trades[0], None, *trades[1:]),
               mart=(mart[0], None, *mart[1:]), bat=(bat[0], None, *bat[1:]))


TABLES = {
    "1": Table(
        "1", "Table 1: robust accuracy (%) on MNIST (LeNet, 50 epochs)", "mnist", "",
        "fraction", tuple(
            _mnist_rows(0.3, at=((98.79, .23), (91.69, 1.25), (88.64, .61)),
                        trades=((98.89, .01), (93.70, .01), (92.31, .21)),
                        mart=((98.78, .16), (92.37, 1.21), (89.62, 1.44)),
                        bat=((98.79, .06), (93.97, .16), (92.19, .13)))
            + _mnist_rows(0.45, at=((11.35, 0), (11.35, 0), (11.35, 0)),
                          trades=((99.42, .05), (11.34, .01), (0.53, .26)),
                          mart=((13.13, 2.54), (7.80, 3.73), (0.93, 1.32)),
                          bat=((97.72, .26), (88.20, .57), (76.09, 1.65)))),
        note="MART trains with SGD from lr 0.01 (the table's footnote).",
        pgd_step_size=0.01),
    "2": Table(
        "2", "Table 2: robust accuracy (%) on CIFAR10 (WRN-28-10, one-cycle, 30 epochs)",
        "cifar10", "", "per255", tuple(
            _rows(8 / 255, at=((85.65, .33), None, (53.64, .03), (50.87, .22)),
                  trades=((82.22, .12), None, (52.14, .08), (48.90, .35)),
                  mart=((77.51, .46), None, (53.87, .08), (48.25, .06)),
                  bat=((84.84, .28), None, (55.64, .37), (52.41, .02)))
            + _rows(16 / 255, at=((72.43, .01), None, (29.01, .13), (24.24, .51)),
                    trades=((70.01, .44), None, (24.52, .06), (14.63, .22)),
                    mart=((65.97, .54), None, (32.65, .40), (23.23, .14)),
                    bat=((77.56, .01), None, (30.79, .35), (25.06, .37))))),
    "3": Table(
        "3", "Table 3: robust accuracy (%) on CIFAR10 with 500K pseudo-labelled images "
        "(RST, cosine lr, 200 epochs)", "cifar10_rst", "", "per255", tuple(
            _rows(8 / 255, at=((91.53, None), None, (59.89, None), (58.41, None)),
                  trades=((89.73, None), None, (61.87, None), (59.45, None)),
                  mart=((89.71, None), None, (62.11, None), (57.97, None)),
                  bat=((89.61, None), None, (62.38, None), (59.54, None)))),
        note="The eps = 16/255 half of Table 3 is not in the text bat_jax was "
        "transcribed from; needs --config.extra_data_path."),
    "B1": Table(
        "B1", "Table B.1: robust accuracy (%) on CIFAR10 (WRN-28-10, step schedule, "
        "100 epochs; final and early-stopped)", "cifar10", "schedule=step", "per255",
        tuple(
            _rows(8 / 255, at=((86.85, .14), (57.33, .23), (45.33, .49), (44.61, .45)),
                  trades=((86.37, .36), (61.24, .30), (51.81, .04), (50.05, .03)),
                  mart=((84.79, .11), (59.81, .73), (49.91, .36), (46.16, .08)),
                  bat=((85.36, .01), (57.53, .41), (47.64, .20), (46.28, .28)))
            + _rows(8 / 255, "best",
                    at=((84.59, .01), (59.19, .45), (53.09, .13), (50.39, .06)),
                    trades=((82.85, .71), (57.73, .35), (52.24, .59), (49.25, .37)),
                    mart=((78.02, .99), (57.19, .73), (53.45, .14), (48.19, .28)),
                    bat=((84.02, .35), (58.92, .03), (55.13, .06), (51.68, .31)))
            + _rows(12 / 255, at=((82.46, .17), (47.73, .08), (29.97, .04), (27.98, .15)),
                    trades=((81.06, .59), (50.59, .19), (33.86, 1.44), (25.21, 1.92)),
                    mart=((79.11, .23), (51.23, .16), (37.86, .85), (31.74, .56)),
                    bat=((81.53, .38), (48.64, .23), (33.42, .62), (30.73, .42)))
            + _rows(12 / 255, "best",
                    at=((78.29, .05), (49.75, .41), (39.77, .35), (35.82, .17)),
                    trades=((78.17, 2.02), (48.00, 2.03), (37.27, .65), (30.35, 3.30)),
                    mart=((72.04, .32), (48.45, 1.03), (41.82, .31), (34.09, .87)),
                    bat=((80.65, .04), (49.47, .27), (41.08, .40), (36.03, .21)))
            + _rows(16 / 255, at=((79.10, .35), (41.31, .71), (19.05, .03), (16.15, .11)),
                    trades=((76.69, 2.60), (40.29, 1.94), (23.83, 6.12), (18.68, 4.65)),
                    mart=((76.04, .00), (45.14, .18), (26.53, .31), (19.62, .52)),
                    bat=((78.59, .43), (42.12, .16), (23.61, .43), (19.95, .48)))
            + _rows(16 / 255, "best",
                    at=((72.43, .01), (42.48, .18), (28.78, .16), (24.23, .53)),
                    trades=((75.01, .46), (41.30, .28), (28.03, .06), (21.86, .18)),
                    mart=((68.09, .45), (41.83, .13), (32.61, .40), (23.36, .19)),
                    bat=((76.06, .01), (41.03, .43), (30.91, .35), (25.06, .34))))),
    "B2": Table(
        "B2", "Table B.2: robust accuracy (%) on CIFAR10 with ResNet-18 (one-cycle)",
        "cifar10", "model=resnet18", "per255", tuple(
            _rows(8 / 255, at=((82.36, None), (57.48, None), (51.87, None), (48.06, None)),
                  trades=((80.91, None), (55.45, None), (51.94, None), (47.88, None)),
                  bat=((83.56, None), (56.27, None), (52.20, None), (48.44, None)))
            + _rows(16 / 255,
                    at=((69.75, None), (40.17, None), (29.47, None), (23.02, None)),
                    trades=((68.26, None), (35.23, None), (26.13, None), (18.01, None)),
                    bat=((77.02, None), (36.64, None), (27.22, None), (21.78, None)),
                    bat_beta10=((73.17, None), (37.73, None), (29.98, None),
                                (23.65, None))))),
    "B3": Table(
        "B3", "Table B.3: robust accuracy (%) on CIFAR100 (ResNet-18, step schedule)",
        "cifar100", "", "per255", tuple(
            _rows(8 / 255, "best",
                  at=((55.92, None), (30.13, None), (26.51, None), (23.70, None)),
                  trades=((54.56, None), (29.82, None), (26.48, None), (23.28, None)),
                  bat=((53.67, None), (29.96, None), (27.76, None), (23.98, None)))),
        note="BAT's beta on CIFAR-100 was chosen from {1, 2, 3, 5, 10}; the paper "
        "does not say which (beta = 5 here). 'Similar to CIFAR10, we use the best "
        "checkpoint': the early-stopped model."),
}
