"""Circuit verification: faithfulness, consistency, completeness, minimality, perturbation,
generalisation and comparison of circuits, each with bootstrap 95% intervals over prompts."""

from circuitlab.verify.analysis import Verification, VerifyParams, verify
from circuitlab.verify.bootstrap import Bootstrap, Interval
from circuitlab.verify.measures import Verifier
from circuitlab.verify.split import split_task

__all__ = ["Bootstrap", "Interval", "Verification", "Verifier", "VerifyParams", "split_task", "verify"]
