"""Evaluation tools: they measure models and read data, and nothing in models/ or datasets/ imports them.

    evaluation/judge.py        the Shapes world's pixel judge: an image's attributes read back from its pixels
    evaluation/judge_check.py  reproduces the judge's claims (renders and VQGAN reconstructions all right)
    evaluation/zero_shot.py    the Shapes world's zero-shot test of a CLIP (train_clip.py's validation)
    evaluation/fid.py          Fréchet distances: in any feature space, and FID through torch-fidelity
    evaluation/real.py         evaluate.py on real captioned images (an image folder or COCO)
    evaluation/scenes_judge.py the scenes world's judge: objects, their colour, shape and centre, the category rules
    evaluation/scenes_eval.py  evaluate.py --world scenes: the five categories' prompts, hard negatives, CLIP alone
    evaluation/scenes_zero_shot.py  train_clip.py --dataset scenes's validation: held-out scenes named among all
"""
