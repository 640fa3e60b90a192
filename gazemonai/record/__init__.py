"""Record gaze on one's own images: gaze sources, samples -> fixations, the GazeMedSeg CSV writer.

Layer: may import :mod:`gazemonai.gaze`, :mod:`gazemonai.prep` and :mod:`gazemonai.errors`; never
:mod:`gazemonai.train` or :mod:`gazemonai.serve` (and they never import it).

Data flow of a recording (one module per step)::

    sources.py / gazepoint.py   tracker, pointer or replay -> GazeSample stream
    samples.py                  GazeSample and the raw sample file
    geometry.py                 where the image is on the screen; screen -> image pixels
    fixations.py                samples -> fixations on the image (pymovements I-VT / I-DT)
    writer.py                   fixations -> GazeMedSeg CSV (+ annotator, recording, accuracy, seconds)
    validation.py               9-point validation accuracy (px, degrees)
"""
