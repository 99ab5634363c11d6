"""The instruments that test the theory of Fu et al., *On the Effectiveness of Parameter-Efficient
Fine-Tuning* (AAAI 2023), on any ``nn.Module``, a ``loss_fn(model, batch) -> mean loss``, a list of batches
and a description of the tunable coordinates (``None``, a list of parameter names, or name -> bool mask).

Modules:
    subspace   the tunable coordinates as one k-vector (tied weights once); batch weighting; eval-mode
               context and the determinism check every measurement runs first
    hessian    HessianOperator: exact Hessian-vector products of the mean loss on the subspace;
               hutchinson_diagonal, the one Hutchinson estimator of diag(H)
    operators  the operator protocol (dim, matvec) and a dense reference operator
    lanczos    Lanczos extremes with Ritz residuals, several random starts (extreme_eigenvalues),
               stochastic Lanczos quadrature, power-iteration baseline
    lipschitz  rho: largest per-sample gradient norm (torch.func.vmap), an empirical estimate
    stability  leave-one-out pointwise hypothesis stability, seed variance, influence functions (CG)
    bounds     Theorem 1 (stability) and Theorem 2 (generalisation) with their assumptions checked
               (strict PSD and the relaxed objective, reported separately)
    ranks      stability rank vs performance rank (Figure 2) from a results table

``theory`` never imports ``sparse_ft``.
"""
