"""bkfac.optim"""
