"""Evaluation (SPEC §1.6): MT-Bench with any OpenAI-compatible judge, offline held-out
measures, and one report per run."""

from fusechat_core.evaluate.judge import JudgeClient, JudgeError, JudgeSettings, grade_answers, parse_rating, summarise
from fusechat_core.evaluate.loading import EvalModel, EvaluationError, load_for_eval, resolve_model
from fusechat_core.evaluate.mt_bench import MTBenchData, MTBenchDataError, Question, answer_questions, load_mt_bench
from fusechat_core.evaluate.nll import exact_match, heldout_nll
from fusechat_core.evaluate.report import build_report, markdown_table
from fusechat_core.evaluate.stage import evaluate_model, evaluate_standalone, loss_history, write_report

__all__ = [
    "EvalModel", "EvaluationError", "JudgeClient", "JudgeError", "JudgeSettings", "MTBenchData",
    "MTBenchDataError", "Question", "answer_questions", "build_report", "evaluate_model", "exact_match",
    "evaluate_standalone", "grade_answers", "heldout_nll", "load_for_eval", "load_mt_bench", "loss_history",
    "markdown_table",
    "parse_rating", "resolve_model", "summarise", "write_report",
]
