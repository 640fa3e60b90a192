"""Data preparation, the bottom of the data flow: files in, arrays and dataset folders out.

``io`` reads and writes the images, masks and maps every later step works on (safely: names from
user data never leave their folder); ``slices`` turns MR volumes into the 2-D slices gaze was
recorded on; ``synthetic`` writes small polyp-like data sets for the demo and the tests.

This package imports nothing of the others but :mod:`gazemonai.errors`.
"""
