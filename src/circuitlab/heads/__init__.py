"""Head analysis: what each attention head does (previous-token, duplicate-token, induction, attention to
BOS) and how heads compose (Q-, K-, V-composition).

Verbs: `detect_heads`, `composition_scores`, `head_analysis`. Types: `HeadScores`, `CompositionScores`,
`HeadsResult`. See docs/METHODS.md, "Head analysis".
"""

from circuitlab.heads.analysis import HeadsResult, head_analysis
from circuitlab.heads.composition import CompositionScores, composition_scores
from circuitlab.heads.detectors import HeadScores, detect_heads

__all__ = ["CompositionScores", "HeadScores", "HeadsResult", "composition_scores", "detect_heads", "head_analysis"]
