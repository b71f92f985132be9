"""Averaging that a bad groupmate cannot ruin: robust reduction, scores, evidence of rejections.

contribscore.py  Each sender's agreement with our own gradient, scored over many rounds
evidence.py      Evidence of rejected contributions, and the admission gate's answer
partreducer.py   `RobustPartReducer`: hivemind's reducer of one span of an all-reduce
reduce.py        Robust reduction of one all-reduce part from several senders
sparsecodec.py   `TopKCodec`: pseudo-gradients as top-k per chunk with low-bit values, checked on arrival
"""
