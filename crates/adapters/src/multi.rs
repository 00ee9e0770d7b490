//! Several adapters on one loaded base: load, switch and unload them without reloading the base, and run one
//! batch whose rows use different adapters (or none). Each module holds every loaded adapter that adapts it;
//! a forward pass sends each adapter the rows routed to it (gathered, run through that adapter alone, added
//! back), as PEFT's mixed-batch inference does, so a row's output is exactly what its adapter alone gives.
//! Linear-layer methods only: the prompt family changes the sequence, not a layer.

use crate::config::AdapterConfig;
use crate::peft::{self, LoadReport};
use candle_core::{Tensor, Var};
use factune_io::{Error, Result};
use factune_model::{Ctx, FrozenParts, LinearAdapter, Model};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

/// Which adapter each batch row uses (indexes into the set's names; `None`: the base alone).
#[derive(Debug, Clone)]
enum Route {
    All(Option<usize>),
    Rows(Vec<Option<usize>>),
}

/// The adapters loaded on a model, by name.
pub struct AdapterSet {
    names: Vec<String>,
    /// Per module path, one slot per name.
    layers: BTreeMap<String, Vec<Option<Arc<dyn LinearAdapter>>>>,
    route: Arc<RwLock<Route>>,
}

impl Default for AdapterSet {
    fn default() -> Self {
        AdapterSet {
            names: Vec::new(),
            layers: BTreeMap::new(),
            route: Arc::new(RwLock::new(Route::All(None))),
        }
    }
}

impl AdapterSet {
    pub fn names(&self) -> &[String] {
        &self.names
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.names.iter().position(|n| n == name).ok_or_else(|| {
            Error::config(format!(
                "no adapter named `{name}` is loaded (loaded: {})",
                if self.names.is_empty() {
                    "none".to_string()
                } else {
                    self.names.join(", ")
                }
            ))
        })
    }

    /// Loads the adapter in `dir` as `name`; the base is not reloaded and the other adapters stay.
    pub fn load_adapter(
        &mut self,
        model: &mut Model,
        name: &str,
        dir: &Path,
    ) -> Result<(AdapterConfig, LoadReport)> {
        if self.names.iter().any(|n| n == name) {
            return Err(Error::config(format!(
                "an adapter named `{name}` is already loaded: unload it first or choose another name"
            )));
        }
        if self.names.is_empty()
            && (model.prompt.is_some() || model.linears().iter().any(|l| l.adapter.is_some()))
        {
            return Err(Error::config(
                "the model already carries an adapter outside this set: load every adapter through it",
            ));
        }
        self.uninstall(model);
        let loaded = peft::load(model, dir, false);
        if model.prompt.is_some() {
            peft::detach(model);
            self.install(model);
            return Err(Error::invalid(
                dir,
                "a prompt-family adapter: several adapters at once are linear-layer methods only",
            ));
        }
        let loaded = match loaded {
            Ok(l) => l,
            Err(e) => {
                peft::detach(model);
                self.install(model);
                return Err(e);
            }
        };
        let k = self.names.len();
        self.names.push(name.to_string());
        for slots in self.layers.values_mut() {
            slots.push(None);
        }
        for l in model.linears_mut() {
            if let Some(a) = l.adapter.take() {
                let slots = self
                    .layers
                    .entry(l.path.clone())
                    .or_insert_with(|| vec![None; k + 1]);
                slots[k] = Some(Arc::from(a));
            }
        }
        self.install(model);
        Ok(loaded)
    }

    /// Every row uses `name` (`None`: the base alone).
    pub fn set_adapter(&self, name: Option<&str>) -> Result<()> {
        let k = name.map(|n| self.index(n)).transpose()?;
        *self.route.write().expect("route lock") = Route::All(k);
        Ok(())
    }

    /// Row `i` of the next batches uses `rows[i]` (`None`: the base alone).
    pub fn route_rows(&self, rows: &[Option<&str>]) -> Result<()> {
        let r = rows
            .iter()
            .map(|n| n.map(|n| self.index(n)).transpose())
            .collect::<Result<Vec<_>>>()?;
        *self.route.write().expect("route lock") = Route::Rows(r);
        Ok(())
    }

    /// Takes the adapter `name` off every module; the others keep their names.
    pub fn unload(&mut self, model: &mut Model, name: &str) -> Result<()> {
        let k = self.index(name)?;
        self.uninstall(model);
        self.names.remove(k);
        for slots in self.layers.values_mut() {
            slots.remove(k);
        }
        self.layers.retain(|_, s| s.iter().any(Option::is_some));
        *self.route.write().expect("route lock") = Route::All(None);
        self.install(model);
        Ok(())
    }

    fn uninstall(&self, model: &mut Model) {
        for l in model.linears_mut() {
            if self.layers.contains_key(&l.path) {
                l.adapter = None;
            }
        }
    }

    fn install(&self, model: &mut Model) {
        for l in model.linears_mut() {
            if let Some(slots) = self.layers.get(&l.path) {
                l.adapter = Some(Box::new(Routed {
                    slots: slots.clone(),
                    route: self.route.clone(),
                }));
            }
        }
    }
}

/// One module's adapters, each applied to the rows routed to it.
struct Routed {
    slots: Vec<Option<Arc<dyn LinearAdapter>>>,
    route: Arc<RwLock<Route>>,
}

impl LinearAdapter for Routed {
    fn method(&self) -> &'static str {
        "MIXED"
    }

    fn forward(
        &self,
        x: &Tensor,
        base_out: Tensor,
        base: &FrozenParts,
        ctx: &Ctx,
    ) -> candle_core::Result<Tensor> {
        let route = self.route.read().expect("route lock").clone();
        let rows = match route {
            Route::All(None) => return Ok(base_out),
            Route::All(Some(k)) => {
                return match &self.slots[k] {
                    Some(a) => a.forward(x, base_out, base, ctx),
                    None => Ok(base_out),
                }
            }
            Route::Rows(r) => r,
        };
        let batch = x.dims()[0];
        if rows.len() != batch {
            candle_core::bail!(
                "{batch} rows in the batch but {} adapter choices routed",
                rows.len()
            );
        }
        let mut out = base_out.clone();
        for (k, slot) in self.slots.iter().enumerate() {
            let Some(a) = slot else { continue };
            let idx: Vec<u32> = (0..batch as u32)
                .filter(|&i| rows[i as usize] == Some(k))
                .collect();
            if idx.is_empty() {
                continue;
            }
            let idx = Tensor::new(idx.as_slice(), x.device())?;
            let (xk, yk) = (x.index_select(&idx, 0)?, base_out.index_select(&idx, 0)?);
            let delta = (a.forward(&xk, yk.clone(), base, ctx)? - yk)?;
            out = out.index_add(&idx, &delta, 0)?;
        }
        Ok(out)
    }

    /// Inference only: nothing of a routed set trains.
    fn parameters(&self) -> Vec<(String, Var)> {
        Vec::new()
    }

    fn delta_weight(&self, _base: &FrozenParts) -> candle_core::Result<Tensor> {
        candle_core::bail!(
            "several adapters share this module: there is no single update to merge (use merge-adapters)"
        )
    }
}
