"""SMEdit (EMSEdit): multi-step meta editing with an l2 norm constraint."""
