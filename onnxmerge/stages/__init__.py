"""The stages of a merge, in order; ``api`` sequences them:

1. ``prepare``: models as the merge reads them (canonical cores, calibration set, depth
   alignment and lifting, members lined up with model 0).
2. ``statistics``: the feature statistics of every merged space.
3. ``matching``: a matching for every merged space.
4. ``assembly``: the merged graph.
5. ``repair``: BN reset or REPAIR of the merged model.
"""
