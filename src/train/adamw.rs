//! Plain f32 AdamW with PyTorch's semantics (`torch.optim.AdamW`, single-tensor path):
//!
//! ```text
//! p = p·(1 − lr·wd)                     (decoupled weight decay, skipped when wd = 0)
//! m = lerp(m, g, 1 − β1)                v = v·β2 + (1 − β2)·g²
//! p = p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)
//! ```
//!
//! Every step is the same sequence of libtorch ops PyTorch runs, so on the same libtorch the
//! results are bit-identical to `torch.optim.AdamW(..., foreach=False)`. Non-finite gradients
//! propagate as in PyTorch.
use super::optim::{
    check_lr, check_params, cpu_snapshot, grad_f32, owned_on, pow_libm, state_field, state_step,
    step_tensor, zero_grads, AdamConfig, Optimizer, StateEntries,
};
use crate::error::Result;
use tch::{Kind, Tensor};

/// The moments of one parameter.
#[derive(Debug)]
struct AdamWState {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// f32 AdamW (8 bytes of state per parameter); see the [module docs](self).
#[derive(Debug)]
pub struct AdamW {
    params: Vec<Tensor>,
    cfg: AdamConfig,
    states: Vec<Option<AdamWState>>,
}

impl AdamW {
    /// An optimizer over `params` (leaf f32 tensors, CPU or CUDA); state is allocated on each
    /// parameter's first step with a gradient, as PyTorch does.
    pub fn new(params: Vec<Tensor>, cfg: AdamConfig) -> Result<Self> {
        cfg.validate()?;
        check_params(&params, "AdamW")?;
        let states = params.iter().map(|_| None).collect();
        Ok(AdamW {
            params,
            cfg,
            states,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.cfg
    }

    /// The parameters, in the order given.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// Steps taken by parameter `i` (None before its first step or for an unknown index).
    pub fn step_count(&self, i: usize) -> Option<u64> {
        self.states.get(i)?.as_ref().map(|s| s.step)
    }

    fn step_param(&mut self, i: usize, lr: f64) -> Result<()> {
        let p = &self.params[i];
        let Some(g) = grad_f32(p, i)? else {
            return Ok(());
        };
        if self.states[i].is_none() {
            let zeros = || Tensor::f_zeros(p.size().as_slice(), (Kind::Float, p.device()));
            self.states[i] = Some(AdamWState {
                step: 0,
                exp_avg: zeros()?,
                exp_avg_sq: zeros()?,
            });
        }
        let Some(st) = self.states[i].as_mut() else {
            return Ok(());
        };
        st.step += 1;
        let (b1, b2) = self.cfg.betas;
        let wd = self.cfg.weight_decay;
        let mut p = p.shallow_clone();
        if wd != 0.0 {
            let _ = p.f_mul_scalar_(1.0 - lr * wd)?;
        }
        let _ = st.exp_avg.f_lerp_(&g, 1.0 - b1)?;
        let _ = st.exp_avg_sq.f_mul_scalar_(b2)?;
        // addcmul_(g, g, value=1−β2) is fma((1−β2)·g, g, v); tch fixes the value at 1, so
        // the product is formed first, with the same rounding.
        let _ = st.exp_avg_sq.f_addcmul_(&g.f_mul_scalar(1.0 - b2)?, &g)?;
        let t = st.step as f64;
        let bias_correction1 = 1.0 - pow_libm(b1, t);
        let bias_correction2 = 1.0 - pow_libm(b2, t);
        let step_size = lr / bias_correction1;
        // PyTorch writes `bias_correction2 ** 0.5`: libm's pow, not sqrt.
        let bias_correction2_sqrt = pow_libm(bias_correction2, 0.5);
        let denom = st
            .exp_avg_sq
            .f_sqrt()?
            .f_div_scalar(bias_correction2_sqrt)?
            .f_add_scalar(self.cfg.eps)?;
        // addcdiv_(m, denom, value=−step) is p + (value·m)/denom.
        let _ = p.f_addcdiv_(&st.exp_avg.f_mul_scalar(-step_size)?, &denom)?;
        Ok(())
    }
}

impl Optimizer for AdamW {
    fn step(&mut self, lr: f64) -> Result<()> {
        check_lr(lr)?;
        tch::no_grad(|| (0..self.params.len()).try_for_each(|i| self.step_param(i, lr)))
    }

    fn zero_grad(&mut self) {
        zero_grads(&mut self.params);
    }

    fn state_bytes(&self) -> usize {
        self.states
            .iter()
            .flatten()
            .map(|s| 4 * (s.exp_avg.numel() + s.exp_avg_sq.numel()))
            .sum()
    }

    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, st) in self.states.iter().enumerate() {
            let Some(st) = st else { continue };
            out.push((format!("state.{i}.step"), step_tensor(st.step)));
            out.push((format!("state.{i}.exp_avg"), cpu_snapshot(&st.exp_avg)));
            out.push((
                format!("state.{i}.exp_avg_sq"),
                cpu_snapshot(&st.exp_avg_sq),
            ));
        }
        out
    }

    fn load_state_dict(&mut self, state: &[(String, Tensor)]) -> Result<()> {
        let entries =
            StateEntries::parse(state, self.params.len(), &["step", "exp_avg", "exp_avg_sq"])?;
        let mut new_states = Vec::with_capacity(self.params.len());
        for (i, p) in self.params.iter().enumerate() {
            let Some(fields) = entries.param(i) else {
                new_states.push(None);
                continue;
            };
            let shape = p.size();
            let dev = p.device();
            let own = |t: &Tensor| owned_on(t, dev);
            new_states.push(Some(AdamWState {
                step: state_step(fields, i)?,
                exp_avg: own(state_field(fields, i, "exp_avg", Kind::Float, &shape)?)?,
                exp_avg_sq: own(state_field(fields, i, "exp_avg_sq", Kind::Float, &shape)?)?,
            }));
        }
        self.states = new_states;
        Ok(())
    }
}
