"""Models written for one chain (``X @ beta``, a Cholesky factor built from parameters), sampled
with ``vectorize="vmap"`` by the default 1024-chain sampler, against long NumPyro NUTS runs.

For each model: the largest |mean difference| in combined Monte-Carlo standard errors, the
largest relative sd difference, the largest R-hat and the divergences. Quality only; run it on
any machine::

    OMP_NUM_THREADS=1 python benchmarks/one_chain_models.py [logistic radon diamonds ar gp]

Needs the ``bench`` extra (NumPyro, JAX).
"""

from __future__ import annotations

import argparse
import time

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch

from pyroflows import mcmc


def make_data(seed: int = 1) -> dict[str, np.ndarray]:
    """Generated data: logistic regression on correlated predictors, varying intercepts (40
    groups), a regression on 12 nearly collinear predictors, an AR(3) series, Poisson counts on
    11 points (a latent Gaussian process)."""
    rng = np.random.default_rng(seed)
    d = {}
    corr = np.linalg.cholesky(0.7 * np.ones((4, 4)) + 0.3 * np.eye(4))
    d["Xl"] = rng.normal(size=(500, 4)) @ corr.T
    logits = d["Xl"] @ np.array([1.0, -0.5, 0.3, 0.0]) + 0.2
    d["yl"] = (rng.random(500) < 1 / (1 + np.exp(-logits))).astype(float)
    d["group"] = rng.integers(0, 40, 400)
    d["xr"] = rng.normal(size=400)
    d["yr"] = 1.0 + rng.normal(0, 0.7, 40)[d["group"]] + 0.5 * d["xr"] + rng.normal(0, 0.8, 400)
    factors = rng.normal(size=(300, 3))
    d["Xd"] = factors @ rng.normal(size=(3, 12)) + 0.1 * rng.normal(size=(300, 12))
    d["yd"] = 0.3 * d["Xd"] @ rng.normal(size=12) + rng.normal(size=300)
    series = np.zeros(203)
    for t in range(3, 203):
        series[t] = 0.2 + 0.5 * series[t - 1] - 0.2 * series[t - 2] + 0.1 * series[t - 3]
        series[t] += rng.normal(0, 0.5)
    d["lags"] = np.stack([series[2 - k : 202 - k] for k in range(3)], 1)
    d["ya"] = series[3:]
    d["xg"] = np.linspace(-10, 10, 11)
    d["kg"] = np.array([40, 37, 29, 12, 4, 3, 9, 19, 77, 82, 33], float)
    return d


def pyro_models(d: dict[str, np.ndarray]) -> dict:
    """The five models as a Pyro user writes them for one chain."""
    t = {
        k: torch.tensor(v, dtype=torch.long if k == "group" else torch.float32)
        for k, v in d.items()
    }
    eye = torch.eye(11)

    def logistic():
        a = pyro.sample("alpha", dist.Normal(0.0, 2.5))
        b = pyro.sample("beta", dist.Normal(0.0, 2.5).expand([4]).to_event(1))
        pyro.sample("y", dist.Bernoulli(logits=a + t["Xl"] @ b).to_event(1), obs=t["yl"])

    def radon():
        mu = pyro.sample("mu_a", dist.Normal(0.0, 5.0))
        sigma_a = pyro.sample("sigma_a", dist.HalfNormal(2.0))
        sigma_y = pyro.sample("sigma_y", dist.HalfNormal(2.0))
        beta = pyro.sample("beta", dist.Normal(0.0, 5.0))
        with pyro.plate("g", 40):
            eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        mean = (mu + sigma_a * eta)[t["group"]] + beta * t["xr"]
        pyro.sample("y", dist.Normal(mean, sigma_y).to_event(1), obs=t["yr"])

    def diamonds():
        a = pyro.sample("alpha", dist.Normal(0.0, 10.0))
        b = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([12]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
        pyro.sample("y", dist.Normal(a + t["Xd"] @ b, sigma).to_event(1), obs=t["yd"])

    def ar():
        a = pyro.sample("alpha", dist.Normal(0.0, 5.0))
        b = pyro.sample("beta", dist.Normal(0.0, 5.0).expand([3]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
        pyro.sample("y", dist.Normal(a + t["lags"] @ b, sigma).to_event(1), obs=t["ya"])

    def gp():
        rho = pyro.sample("rho", dist.Gamma(25.0, 4.0))
        alpha = pyro.sample("alpha", dist.HalfNormal(2.0))
        f_tilde = pyro.sample("f_tilde", dist.Normal(0.0, 1.0).expand([11]).to_event(1))
        sq = (t["xg"][:, None] - t["xg"][None, :]) ** 2
        cov = alpha**2 * torch.exp(-sq / (2 * rho**2)) + 1.01e-4 * eye
        f = torch.linalg.cholesky(cov) @ f_tilde
        pyro.sample("k", dist.Poisson(f.exp()).to_event(1), obs=t["kg"])

    return dict(logistic=logistic, radon=radon, diamonds=diamonds, ar=ar, gp=gp)


def numpyro_models(d: dict[str, np.ndarray]) -> dict:
    """The same models in NumPyro, for the reference runs."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as nd

    def logistic():
        a = numpyro.sample("alpha", nd.Normal(0.0, 2.5))
        b = numpyro.sample("beta", nd.Normal(0.0, 2.5).expand([4]).to_event(1))
        numpyro.sample("y", nd.Bernoulli(logits=a + d["Xl"] @ b).to_event(1), obs=d["yl"])

    def radon():
        mu = numpyro.sample("mu_a", nd.Normal(0.0, 5.0))
        sigma_a = numpyro.sample("sigma_a", nd.HalfNormal(2.0))
        sigma_y = numpyro.sample("sigma_y", nd.HalfNormal(2.0))
        beta = numpyro.sample("beta", nd.Normal(0.0, 5.0))
        eta = numpyro.sample("eta", nd.Normal(0.0, 1.0).expand([40]).to_event(1))
        mean = (mu + sigma_a * eta)[d["group"]] + beta * d["xr"]
        numpyro.sample("y", nd.Normal(mean, sigma_y).to_event(1), obs=d["yr"])

    def diamonds():
        a = numpyro.sample("alpha", nd.Normal(0.0, 10.0))
        b = numpyro.sample("beta", nd.Normal(0.0, 10.0).expand([12]).to_event(1))
        sigma = numpyro.sample("sigma", nd.HalfNormal(5.0))
        numpyro.sample("y", nd.Normal(a + d["Xd"] @ b, sigma).to_event(1), obs=d["yd"])

    def ar():
        a = numpyro.sample("alpha", nd.Normal(0.0, 5.0))
        b = numpyro.sample("beta", nd.Normal(0.0, 5.0).expand([3]).to_event(1))
        sigma = numpyro.sample("sigma", nd.HalfCauchy(2.5))
        numpyro.sample("y", nd.Normal(a + d["lags"] @ b, sigma).to_event(1), obs=d["ya"])

    def gp():
        rho = numpyro.sample("rho", nd.Gamma(25.0, 4.0))
        alpha = numpyro.sample("alpha", nd.HalfNormal(2.0))
        f_tilde = numpyro.sample("f_tilde", nd.Normal(0.0, 1.0).expand([11]).to_event(1))
        sq = (d["xg"][:, None] - d["xg"][None, :]) ** 2
        cov = alpha**2 * jnp.exp(-sq / (2 * rho**2)) + 1.01e-4 * jnp.eye(11)
        f = jnp.linalg.cholesky(cov) @ f_tilde
        numpyro.sample("k", nd.Poisson(jnp.exp(f)).to_event(1), obs=d["kg"])

    return dict(logistic=logistic, radon=radon, diamonds=diamonds, ar=ar, gp=gp)


def compare(ours: az.InferenceData, ref: az.InferenceData) -> tuple[float, float, float]:
    """Largest |z| of the mean difference, |sd ratio - 1| and R-hat over every coordinate."""
    worst = [0.0, 0.0, 0.0]
    for name in ours.posterior.data_vars:
        a = ours.posterior[name].values
        b = ref.posterior[name].values
        a, b = a.reshape(*a.shape[:2], -1), b.reshape(*b.shape[:2], -1)
        for j in range(a.shape[-1]):
            da, db = az.convert_to_dataset(a[..., j]), az.convert_to_dataset(b[..., j])
            se = np.hypot(float(az.mcse(da)["x"]), float(az.mcse(db)["x"]))
            z = abs(a[..., j].mean() - b[..., j].mean()) / se
            sd = abs(a[..., j].std() / b[..., j].std() - 1)
            rhat = float(az.rhat(da)["x"])
            worst = [max(worst[0], z), max(worst[1], sd), max(worst[2], rhat)]
    return worst[0], worst[1], worst[2]


def main() -> None:
    """Run the comparison and print one row per model."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=["logistic", "radon", "diamonds", "ar", "gp"])
    parser.add_argument("--chains", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import jax
    from numpyro.infer import MCMC, NUTS

    jax.config.update("jax_enable_x64", True)
    data = make_data()
    ours, theirs = pyro_models(data), numpyro_models(data)
    print("| model | max mean error (se) | max sd error | max R-hat | divergences | NUTS "
          "divergences | leapfrog steps | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        reference = MCMC(NUTS(theirs[name]), num_warmup=2000, num_samples=10_000, num_chains=4,
                         chain_method="sequential", progress_bar=False)
        reference.run(jax.random.PRNGKey(args.seed))
        ref = az.from_numpyro(reference)
        start = time.perf_counter()
        idata = mcmc.sample(
            mcmc.HMC(model=ours[name]), num_chains=args.chains, num_samples=args.samples,
            warmup_steps=args.warmup, seed=args.seed, progress=False, vectorize="vmap",
        )
        seconds = time.perf_counter() - start
        z, sd, rhat = compare(idata, ref)
        stats = idata.sample_stats
        print(f"| {name} | {z:.2f} | {sd:.3f} | {rhat:.4f} | {int(stats['diverging'].sum())} | "
              f"{int(ref.sample_stats['diverging'].sum())} | {float(stats['n_steps'].mean()):.1f} "
              f"| {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
