//! Tensor-train (MPO) adapters, factune's `peft_type = "MPO"` (PEFT has no tensor adapters):
//! `y = x Wᵀ + x ΔWᵀ` with ΔW a matrix product operator of bond dimension χ (`bond_dim`) over `mpo_modes`
//! modes, contracted mode by mode so ΔW is never formed while training.
//!
//! `init_weights = "dota"` (DoTA): the cores are the truncated MPO of the pretrained W, and the frozen weight
//! becomes the residual `W − MPO_χ(W)`, so the model is unchanged at step 0 (PiSSA's idea in tensor form).
//! On a 4-bit base the residual is held in NF4: QDoTA. Loading recomputes the residual from W (TT-SVD is
//! deterministic), as PiSSA's native form does. `init_weights = "random"`: the same cores drawn at random
//! with the last one zero, the baseline DoTA is measured against.
//!
//! On disk: `base_model.model.<module>.mpo_cores.<k>` of shape `[χ_{k−1}, j_k, i_k, χ_k]`.

use crate::config::AdapterConfig;
use crate::kaiming_uniform;
use crate::registry::{Attachment, LinearMethod, Method};
use candle_core::{DType, Tensor, Var};
use factune_io::{Error, Result};
use factune_model::mpo::{self, Modes};
use factune_model::{AdaptableLinear, Ctx, FrozenParts, LinearAdapter};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::collections::HashMap;

factune_io::choice! {
    /// How MPO cores start: DoTA's truncated MPO of W (residual frozen), or random with the last core zero.
    pub enum MpoInit for "init_weights" {
        Dota = "dota",
        Random = "random",
    }
}

crate::keys::method_keys! {
    /// MPO adapters' keys (factune's own `peft_type = "MPO"`).
    pub struct MpoConfig {
        /// MPO adapters: bond dimension χ capping every bond.
        bond_dim: usize = 8,
        /// MPO adapters: modes each side of a weight is factored into (2 to 5).
        mpo_modes: usize = 3,
        /// MPO adapters: mode factorisations per layer shape, `OUTxIN=j1*j2*j3/i1*i2*i3, …` (others automatic).
        mpo_factors: Option<MpoFactors> = None,
        /// MPO adapters: `dota` (cores from W's truncated MPO, residual frozen) or `random` (last core zero).
        init_weights: MpoInit = MpoInit::Dota,
    }
}

/// `mpo_factors`: mode factorisations by layer shape, `"OUTxIN": [[j_1, …], [i_1, …]]`, also read from the
/// flag / TOML string form `"192x512=8*8*3/8*8*8, 192x192=4*6*8/4*6*8"`.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(transparent)]
pub struct MpoFactors(pub BTreeMap<String, [Vec<usize>; 2]>);

impl MpoFactors {
    /// Parses the string form.
    pub fn parse(spec: &str) -> Result<Self> {
        let bad = |part: &str| {
            Error::config(format!(
                "mpo_factors `{part}`: expected OUTxIN=j1*j2*…/i1*i2*… (e.g. 192x512=8*8*3/8*8*8)"
            ))
        };
        let nums = |s: &str| -> Option<Vec<usize>> {
            s.split('*').map(|n| n.trim().parse().ok()).collect()
        };
        spec.split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|part| {
                let (shape, f) = part.split_once('=').ok_or_else(|| bad(part))?;
                let (o, i) = f.split_once('/').ok_or_else(|| bad(part))?;
                Ok((
                    shape.trim().to_string(),
                    [
                        nums(o).ok_or_else(|| bad(part))?,
                        nums(i).ok_or_else(|| bad(part))?,
                    ],
                ))
            })
            .collect::<Result<_>>()
            .map(MpoFactors)
    }
}

impl<'de> Deserialize<'de> for MpoFactors {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Spec(String),
            Map(BTreeMap<String, [Vec<usize>; 2]>),
        }
        match Form::deserialize(d)? {
            Form::Spec(s) => MpoFactors::parse(&s).map_err(serde::de::Error::custom),
            Form::Map(m) => Ok(MpoFactors(m)),
        }
    }
}

const CORE_NAMES: [&str; 5] = [
    "mpo_cores.0",
    "mpo_cores.1",
    "mpo_cores.2",
    "mpo_cores.3",
    "mpo_cores.4",
];

pub struct MpoAdapter {
    pub cores: Vec<Var>,
    pub modes: Modes,
    pub dropout: f64,
}

impl LinearAdapter for MpoAdapter {
    fn method(&self) -> &'static str {
        "MPO"
    }

    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        _base: &FrozenParts,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let x = crate::adapter_input(x, self.dropout, ctx)?;
        let cores: Vec<Tensor> = self.cores.iter().map(|v| v.as_tensor().clone()).collect();
        base_out + mpo::contract(&x, &cores, &self.modes)?
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        self.cores
            .iter()
            .enumerate()
            .map(|(k, v)| (CORE_NAMES[k].to_string(), v.clone()))
            .collect()
    }

    fn delta_weight(&self, base: &FrozenParts) -> candle_core::Result<Tensor> {
        let cores: Vec<Tensor> = self.cores.iter().map(|v| v.as_tensor().clone()).collect();
        mpo::dense(&cores, &self.modes, base.weight.device())
    }
}

pub struct MpoMethod;

struct Settings {
    chi: usize,
    modes: Modes,
    dota: bool,
}

fn settings(cfg: &AdapterConfig, layer: &AdaptableLinear) -> Result<Settings> {
    let own: &MpoConfig = cfg.options()?;
    let n = own.mpo_modes;
    if !(2..=CORE_NAMES.len()).contains(&n) {
        return Err(Error::config(format!(
            "mpo_modes = {n}: expected 2 to {}",
            CORE_NAMES.len()
        )));
    }
    let chi = own.bond_dim;
    if chi == 0 {
        return Err(Error::config("bond_dim must be > 0"));
    }
    let dota = own.init_weights == MpoInit::Dota;
    let (o, i) = (layer.out_features(), layer.in_features());
    let modes = match own
        .mpo_factors
        .as_ref()
        .and_then(|m| m.0.get(&format!("{o}x{i}")))
    {
        Some([jo, io]) => {
            if jo.len() != n {
                return Err(Error::config(format!(
                    "mpo_factors for {o}x{i} has {} modes, mpo_modes is {n}",
                    jo.len()
                )));
            }
            Modes::given(o, i, jo, io)?
        }
        None => Modes::balanced(o, i, n),
    };
    Ok(Settings { chi, modes, dota })
}

/// DoTA: cores from TT-SVD of W, the layer's weight replaced by the residual. Returns the cores.
fn dota_init(layer: &mut AdaptableLinear, s: &Settings) -> Result<Vec<Tensor>> {
    let w = layer.base.weight.dense()?.to_dtype(DType::F32)?;
    let t = mpo::tt_svd(&w, &s.modes, s.chi)?;
    let approx = mpo::dense(&t.cores, &s.modes, w.device())?;
    layer.base.replace_weight((&w - approx)?)?;
    Ok(t.cores)
}

impl Method for MpoMethod {
    fn peft_type(&self) -> &'static str {
        "MPO"
    }

    fn attachment(&self) -> Attachment<'_> {
        Attachment::Linear(self)
    }
}

impl LinearMethod for MpoMethod {
    fn tensor_names(&self, cfg: &AdapterConfig) -> Vec<&'static str> {
        // a config of another method names no cores (loading then reports the mismatch)
        let n = cfg
            .options::<MpoConfig>()
            .map_or(0, |m| m.mpo_modes)
            .clamp(1, CORE_NAMES.len());
        CORE_NAMES[..n].to_vec()
    }

    fn init(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        _rank: usize,
        _alpha: f64,
        rng: &mut ChaCha8Rng,
        _shared: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        let s = settings(cfg, layer)?;
        let dev = layer.base.weight.device().clone();
        let cores = if s.dota {
            dota_init(layer, &s)?
        } else {
            let shapes = s.modes.core_shapes(s.chi);
            let last = shapes.len() - 1;
            shapes
                .iter()
                .enumerate()
                .map(|(k, sh)| {
                    if k == last {
                        Tensor::zeros(&sh[..], DType::F32, &dev)
                    } else {
                        kaiming_uniform(&sh[..], sh[0] * sh[2], rng, &dev)
                    }
                })
                .collect::<candle_core::Result<_>>()?
        };
        Ok(Box::new(MpoAdapter {
            cores: cores
                .iter()
                .map(Var::from_tensor)
                .collect::<candle_core::Result<_>>()?,
            modes: s.modes,
            dropout: cfg.dropout(),
        }))
    }

    fn load_tensors(
        &self,
        cfg: &AdapterConfig,
        layer: &mut AdaptableLinear,
        _alpha: f64,
        t: &HashMap<String, Tensor>,
    ) -> Result<Box<dyn LinearAdapter>> {
        let s = settings(cfg, layer)?;
        let want = s.modes.core_shapes(s.chi);
        let names = self.tensor_names(cfg);
        for (n, sh) in names.iter().zip(&want) {
            if t[*n].dims() != sh {
                return Err(Error::config(format!(
                    "`{}`: {n} has shape {:?}, expected {sh:?} (bond_dim {}, modes {:?} × {:?})",
                    layer.path,
                    t[*n].dims(),
                    s.chi,
                    s.modes.out,
                    s.modes.inp
                )));
            }
        }
        if s.dota {
            // the saved cores were trained against the residual W − MPO_χ(W): rebuild it
            dota_init(layer, &s)?;
        }
        Ok(Box::new(MpoAdapter {
            cores: names
                .iter()
                .map(|n| Var::from_tensor(&t[*n]))
                .collect::<candle_core::Result<_>>()?,
            modes: s.modes,
            dropout: cfg.dropout(),
        }))
    }
}
