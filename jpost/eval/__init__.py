"""Evaluation: ground-truth accuracy, pairwise judging, leaderboards, human
evaluation and reports.

    ground_truth  pass@k, maj@k, accuracy with a Wilson interval
    pairwise      strict JSON judge verdicts, position-swapped pair judging,
                  majority votes, win rates
    battles       the battle log format shared by win rates and leaderboards
    leaderboard   Bradley-Terry ratings, bootstrap intervals, online Elo
    sheets/human  rating sheets for people, import checks, aggregation
    agreement     Fleiss' kappa, Krippendorff's alpha
    report        report.md / report.html and plots
"""

from jpost.eval.agreement import fleiss_kappa, krippendorff_alpha
from jpost.eval.ground_truth import accuracy_report, maj_at_k, pass_at_k
from jpost.eval.human import (RatingRecord, Ratings, aggregate,
                              import_ratings)
from jpost.eval.intervals import wilson_interval
# The `leaderboard` function is not re-exported: the name would hide the
# module `jpost.eval.leaderboard`. Use jpost.eval.leaderboard.leaderboard.
from jpost.eval.leaderboard import (bootstrap_intervals, bradley_terry,
                                    online_elo)
from jpost.eval.pairwise import (PAIRWISE_PROMPT, OUTCOMES, VERDICTS,
                                 PairResult, VerdictError, judge_pair,
                                 majority_vote, parse_judgement,
                                 parse_verdict, to_battle, win_matrix,
                                 win_rates)
from jpost.eval.report import (Section, plot_leaderboard, plot_scores,
                               plot_win_matrix, write_report)
from jpost.eval.sheets import (SheetFiles, export_pairwise_sheet,
                               export_pointwise_sheet)

__all__ = [
    'OUTCOMES', 'PAIRWISE_PROMPT', 'PairResult', 'RatingRecord', 'Ratings',
    'Section', 'SheetFiles', 'VERDICTS', 'VerdictError', 'accuracy_report',
    'aggregate', 'bootstrap_intervals', 'bradley_terry',
    'export_pairwise_sheet', 'export_pointwise_sheet', 'fleiss_kappa',
    'import_ratings', 'judge_pair', 'krippendorff_alpha',
    'maj_at_k', 'majority_vote', 'online_elo', 'parse_judgement',
    'parse_verdict', 'plot_leaderboard', 'plot_scores', 'plot_win_matrix',
    'pass_at_k', 'to_battle', 'wilson_interval', 'win_matrix', 'win_rates',
    'write_report',
]
