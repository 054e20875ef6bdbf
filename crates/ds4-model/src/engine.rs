//! A loaded model ([`Model`]: file, shape, plan, weights) and the [`Engine`] that creates
//! backends and sessions over it.

use std::path::Path;
use std::sync::Arc;

use ds4_gguf::Gguf;

use crate::cpu::CpuBackend;
use crate::error::{ModelError, Result};
use crate::plan::Plan;
use crate::session::{Session, SessionOptions};
use crate::shape::Shape;
use crate::steer::Steering;
use crate::weights::Weights;

/// The model: the open file (kept alive for the zero-copy weight views), its shape, plan and
/// validated weights.
#[derive(Debug)]
pub struct Model {
    pub gguf: Arc<Gguf>,
    pub shape: Shape,
    pub plan: Plan,
    pub weights: Weights,
}

impl Model {
    /// Validate the metadata, derive the plan and bind every tensor.
    pub fn load(gguf: Arc<Gguf>) -> Result<Model> {
        let shape = Shape::from_gguf(&gguf)?;
        let plan = Plan::new(&shape);
        let weights = Weights::bind(&gguf, &shape, &plan)?;
        let m = Model {
            gguf,
            shape,
            plan,
            weights,
        };
        m.check_kernels()?;
        Ok(m)
    }

    /// Every matrix must have a CPU kernel (the CPU backend is the reference every backend is
    /// held to, so it must run any file the loader accepts).
    fn check_kernels(&self) -> Result<()> {
        let w = &self.weights;
        let mut mats = vec![&w.token_embd.t, &w.out_hc_fn.t, &w.output.t];
        for l in &w.layers {
            mats.extend([
                &l.hc_attn.fn_.t,
                &l.q_a.t,
                &l.q_b.t,
                &l.kv.t,
                &l.out_a.t,
                &l.out_b.t,
                &l.hc_ffn.fn_.t,
                &l.router.t,
                &l.gate_exps.t,
                &l.up_exps.t,
                &l.down_exps.t,
                &l.gate_shexp.t,
                &l.up_shexp.t,
                &l.down_shexp.t,
            ]);
            if let Some(c) = &l.compressor {
                mats.extend([&c.kv.t, &c.gate.t]);
            }
            if let Some(ix) = &l.indexer {
                mats.extend([&ix.q_b.t, &ix.proj.t, &ix.comp.kv.t, &ix.comp.gate.t]);
            }
        }
        for t in mats {
            let bs = t.ty.block_size() as u64;
            if !crate::linear::supported(t.ty) || t.dims[0] % bs != 0 {
                return Err(ModelError::WrongType {
                    name: t.name.clone(),
                    expected: "a type the CPU kernels support with whole blocks per row".into(),
                    found: t.ty,
                });
            }
        }
        Ok(())
    }
}

/// Which backend a session runs on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendKind {
    /// The CPU reference backend (this crate).
    #[default]
    Cpu,
    /// The CUDA backend: provided by `ds4-cuda`, which builds a [`crate::Backend`] for
    /// [`Session::with_backend`]; [`Engine::new_session`] refuses it.
    Cuda,
}

/// Engine options.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineOptions {
    /// QAT simulation (FP8 KV rows, Hadamard+FP4 indexer). On by default: it is part of the
    /// model; switch it off only to compare with implementations that omit it (`--no-qat`).
    pub qat: bool,
    /// CPU threads (`None`: all cores).
    pub threads: Option<usize>,
    pub backend: BackendKind,
    /// Directional steering applied by every backend the engine makes (`None`: the normal
    /// path; see [`crate::steer`]). It must be built for this model's shape.
    pub steering: Option<Arc<Steering>>,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            qat: true,
            threads: None,
            backend: BackendKind::Cpu,
            steering: None,
        }
    }
}

/// A loaded model plus options; creates backends and sessions.
#[derive(Clone, Debug)]
pub struct Engine {
    model: Arc<Model>,
    opts: EngineOptions,
    pool: Arc<rayon::ThreadPool>,
}

impl Engine {
    /// Open and load a GGUF file.
    pub fn open(path: impl AsRef<Path>, opts: EngineOptions) -> Result<Engine> {
        let g = Gguf::open(path)?;
        Engine::from_gguf(Arc::new(g), opts)
    }

    /// Load from an open file.
    pub fn from_gguf(gguf: Arc<Gguf>, opts: EngineOptions) -> Result<Engine> {
        let model = Arc::new(Model::load(gguf)?);
        Engine::from_model(model, opts)
    }

    /// Wrap an already loaded model (several engines may share one).
    pub fn from_model(model: Arc<Model>, opts: EngineOptions) -> Result<Engine> {
        let mut b = rayon::ThreadPoolBuilder::new().thread_name(|i| format!("ds4-cpu-{i}"));
        if let Some(n) = opts.threads {
            if n == 0 {
                return Err(ModelError::BadOption("threads must be at least 1".into()));
            }
            b = b.num_threads(n);
        }
        if let Some(st) = &opts.steering
            && !st.fits(&model.shape)
        {
            let (l, e) = st.dims();
            return Err(ModelError::Steering(format!(
                "directions for {l} layers × {e}, the model has {} × {}",
                model.shape.n_layer, model.shape.n_embd
            )));
        }
        let pool = b
            .build()
            .map_err(|e| ModelError::BadOption(format!("cannot start the thread pool: {e}")))?;
        Ok(Engine {
            model,
            opts,
            pool: Arc::new(pool),
        })
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }
    pub fn shape(&self) -> &Shape {
        &self.model.shape
    }
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }
    /// The engine's CPU thread pool.
    pub fn pool(&self) -> &Arc<rayon::ThreadPool> {
        &self.pool
    }

    /// A CPU backend with room for `ctx` tokens (with the engine's steering).
    pub fn cpu_backend(&self, ctx: usize) -> Result<CpuBackend> {
        CpuBackend::new(self.model.clone(), self.pool.clone(), self.opts.qat, ctx)?
            .with_steering(self.opts.steering.clone())
    }

    /// The directional steering every backend of this engine applies.
    pub fn steering(&self) -> Option<&Arc<Steering>> {
        self.opts.steering.as_ref()
    }

    /// A session on the configured backend (CPU; see [`BackendKind::Cuda`]).
    pub fn new_session(&self, opts: SessionOptions) -> Result<Session> {
        match self.opts.backend {
            BackendKind::Cpu => {
                let b = self.cpu_backend(opts.ctx)?;
                Session::with_backend(Box::new(b), opts)
            }
            BackendKind::Cuda => Err(ModelError::BadOption(
                "the CUDA backend is built by ds4-cuda; pass it to Session::with_backend".into(),
            )),
        }
    }
}
