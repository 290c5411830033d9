"""bkfac.curvature"""
