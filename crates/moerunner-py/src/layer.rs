//! `NativeLayer`: a loaded layer and one forward call on Python tensors. CPU tensors go through
//! the host entry point of the layer's backend; CUDA tensors go to the CUDA layer's device-memory
//! entry point (`CudaLayer::enqueue_on`) on the caller's stream, launches only.

use std::collections::HashMap;
use std::path::PathBuf;

use moerunner::backend::LoadedLayer;
use moerunner::checkpoint::{self, LoadOptions};
use moerunner::tensor::Bytes;
use moerunner::{
    BackendChoice, ForwardInput, HostTensor, MoeLayer, Parallelism, RoutingInput, Runner,
    WeightFormat,
};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use crate::errors::to_py;
use crate::tensors::{arg_error, import, CudaStream, Place, View};

/// How a layer runs: a backend's host entry point, or the CUDA layer itself (both entries).
enum Exec {
    Host(Box<dyn LoadedLayer>),
    #[cfg(feature = "cuda")]
    Cuda {
        layer: Box<moerunner::backend::cuda::layer::CudaLayer>,
        ordinal: i32,
    },
}

impl Exec {
    fn loaded(&self) -> &dyn LoadedLayer {
        match self {
            Exec::Host(l) => &**l,
            #[cfg(feature = "cuda")]
            Exec::Cuda { layer, .. } => &**layer,
        }
    }
}

/// The router a checkpoint layer ships, or a layer file carries (`convert` writes it): hidden
/// states → logits on the host.
struct Router {
    weight: HostTensor,
    bias: Option<Vec<f32>>,
}

/// A layer loaded on a device. Made by `from_file` / `from_checkpoint`; called by
/// `moerunner.MoeLayer`, which allocates `out` and finds torch's stream.
#[pyclass(frozen, module = "moerunner._native")]
pub struct NativeLayer {
    exec: Exec,
    router: Option<Router>,
}

fn parallelism(tp_size: usize, tp_rank: usize, ep_size: usize, ep_rank: usize) -> Parallelism {
    Parallelism {
        ep_size,
        ep_rank,
        tp_size,
        tp_rank,
    }
}

/// `cuda` / `cuda:N` → N.
fn cuda_ordinal(device: &str) -> Option<PyResult<i32>> {
    let rest = device.strip_prefix("cuda")?;
    Some(match rest {
        "" => Ok(0),
        _ => rest
            .strip_prefix(':')
            .and_then(|n| n.parse::<i32>().ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                PyValueError::new_err(format!("device: {device:?} is not `cuda` or `cuda:N`"))
            }),
    })
}

#[cfg(feature = "cuda")]
fn load_cuda(layer: MoeLayer, ordinal: i32) -> moerunner::Result<Exec> {
    use moerunner::backend::cuda;
    cuda::supports_config(layer.config()).map_err(moerunner::MoeError::Unsupported)?;
    let dev = cuda::device::Device::open(ordinal as usize)?;
    Ok(Exec::Cuda {
        layer: Box::new(cuda::layer::CudaLayer::load(
            dev,
            std::sync::Arc::new(layer),
        )?),
        ordinal,
    })
}

#[cfg(not(feature = "cuda"))]
fn load_cuda(_layer: MoeLayer, _ordinal: i32) -> moerunner::Result<Exec> {
    Err(moerunner::MoeError::Cuda(
        "this build of the package has no CUDA backend (the `cuda` feature is off)".into(),
    ))
}

/// Loads `layer` on `device`: `auto` (GPU 0 when present and able, else the CPU), `cpu`,
/// `cuda[:N]`, `reference` (the float64 reference).
fn load(layer: MoeLayer, device: &str) -> PyResult<Exec> {
    if let Some(ordinal) = cuda_ordinal(device) {
        return load_cuda(layer, ordinal?).map_err(to_py);
    }
    let runner = Runner::new();
    let choice = match device {
        "auto" => {
            let cuda_ok = runner.supports(&BackendChoice::Named("cuda".into()), layer.config());
            if cuda_ok.is_ok() {
                return load_cuda(layer, 0).map_err(to_py);
            }
            BackendChoice::Named("cpu".into())
        }
        "cpu" | "reference" => BackendChoice::Named(device.into()),
        other => {
            return Err(PyValueError::new_err(format!(
                "device: {other:?} is not one of auto, cpu, cuda, cuda:N, reference"
            )))
        }
    };
    Ok(Exec::Host(runner.load(layer, &choice).map_err(to_py)?))
}

/// The routing arguments of one call, imported.
struct Routing {
    logits: Option<View>,
    ids: Option<View>,
    weights: Option<View>,
    packed: Option<View>,
}

impl Routing {
    fn views(&self) -> impl Iterator<Item = &View> {
        [&self.logits, &self.ids, &self.weights, &self.packed]
            .into_iter()
            .flatten()
    }
}

fn expect_shape(v: &View, want: &[usize], what: &str) -> PyResult<()> {
    if v.shape != want {
        return Err(arg_error(
            v.name,
            format!("shape {:?}, expected {what} = {want:?}", v.shape),
        ));
    }
    Ok(())
}

fn host_tensor(v: &View) -> PyResult<HostTensor> {
    let bytes = Bytes::Owned(v.host_bytes()?.to_vec());
    HostTensor::new(v.name, v.dtype, v.shape.clone(), bytes).map_err(to_py)
}

impl NativeLayer {
    fn layer(&self) -> &MoeLayer {
        self.exec.loaded().layer()
    }

    /// Shapes, dtypes, places and overlaps every call checks, whichever entry it takes.
    fn check_call(&self, hidden: &View, out: &View, routing: &Routing) -> PyResult<usize> {
        let cfg = self.layer().config();
        let (h, e, k) = (cfg.hidden, cfg.num_experts, cfg.routing.top_k);
        if hidden.shape.len() != 2 || hidden.shape[1] != h {
            return Err(arg_error(
                hidden.name,
                format!("shape {:?}, expected [T, H] = [T, {h}]", hidden.shape),
            ));
        }
        let t = hidden.shape[0];
        if out.dtype != hidden.dtype {
            return Err(PyTypeError::new_err(format!(
                "out: dtype {}, but hidden_states is {} (the output has the dtype of hidden_states)",
                out.dtype, hidden.dtype
            )));
        }
        expect_shape(out, &hidden.shape, "the shape of hidden_states")?;
        if out.read_only {
            return Err(arg_error(out.name, "is read-only".into()));
        }
        if let Some(l) = &routing.logits {
            expect_shape(l, &[t, e], "[T, E]")?;
        }
        for v in [&routing.ids, &routing.weights, &routing.packed]
            .into_iter()
            .flatten()
        {
            expect_shape(v, &[t, k], "[T, top_k]")?;
        }
        for v in std::iter::once(hidden).chain(routing.views()) {
            if v.place != out.place {
                return Err(arg_error(
                    v.name,
                    format!("is on {}, but out is on {}", v.place, out.place),
                ));
            }
            let (a, b) = (v.span(), out.span());
            if out.nbytes() > 0 && v.nbytes() > 0 && a.start < b.end && b.start < a.end {
                return Err(arg_error(
                    out.name,
                    format!(
                        "shares memory with {} (an output is never an input)",
                        v.name
                    ),
                ));
            }
        }
        Ok(t)
    }

    fn forward_host(
        &self,
        py: Python<'_>,
        hidden: &View,
        out: &mut View,
        routing: &Routing,
    ) -> PyResult<()> {
        let x = host_tensor(hidden)?;
        let tensor = |v: &Option<View>| v.as_ref().map(host_tensor).transpose();
        let (logits, ids, weights, packed) = (
            tensor(&routing.logits)?,
            tensor(&routing.ids)?,
            tensor(&routing.weights)?,
            tensor(&routing.packed)?,
        );
        let layer = self.layer();
        let computed;
        let routing = match (&logits, &ids, &weights, &packed) {
            (Some(l), None, None, None) => RoutingInput::Logits(l),
            (None, Some(ids), Some(weights), None) => RoutingInput::TopK { ids, weights },
            (None, None, None, Some(p)) => RoutingInput::Packed(p),
            (None, None, None, None) => {
                let router = self.router.as_ref().ok_or_else(|| {
                    PyTypeError::new_err(
                        "router_logits: required (give router_logits, topk_ids + topk_weights or \
                         topk_packed; only a layer from a checkpoint, or a layer file that carries \
                         its router, routes hidden states itself)",
                    )
                })?;
                computed = checkpoint::router_logits(
                    layer,
                    Some(&router.weight),
                    router.bias.as_deref(),
                    &x,
                )
                .map_err(to_py)?;
                RoutingInput::Logits(&computed)
            }
            _ => return Err(routing_forms_error()),
        };
        let loaded = self.exec.loaded();
        // The runner's layers check their output for non-finite values; the CUDA layer held
        // here directly does not.
        let unchecked = !matches!(self.exec, Exec::Host(_));
        let input = ForwardInput {
            hidden: &x,
            routing,
        };
        let result = py.detach(|| {
            let output = loaded.forward(&input)?;
            if unchecked {
                moerunner::forward::check_output(&output)?;
            }
            Ok::<_, moerunner::MoeError>(output)
        });
        let output = result.map_err(to_py)?;
        out.write_host(&output.output.bytes)
    }

    #[cfg(feature = "cuda")]
    fn forward_cuda(
        &self,
        py: Python<'_>,
        hidden: &View,
        out: &View,
        routing: &Routing,
        ordinal_of_tensors: i32,
        stream: usize,
    ) -> PyResult<()> {
        use moerunner::backend::cuda::device_call::{DeviceCall, DeviceRoutes};
        use moerunner::DType;
        let Exec::Cuda { layer, ordinal } = &self.exec else {
            return Err(arg_error(
                hidden.name,
                format!(
                    "is on cuda:{ordinal_of_tensors} but the layer is on the {} backend \
                     (load it with device=\"cuda:{ordinal_of_tensors}\")",
                    self.exec.loaded().backend()
                ),
            ));
        };
        if *ordinal != ordinal_of_tensors {
            return Err(arg_error(
                hidden.name,
                format!("is on cuda:{ordinal_of_tensors}, the layer on cuda:{ordinal}"),
            ));
        }
        let want = |v: &View, dtype: DType| {
            if v.dtype == dtype {
                Ok(())
            } else {
                Err(PyTypeError::new_err(format!(
                    "{}: dtype {}, expected {dtype} on CUDA",
                    v.name, v.dtype
                )))
            }
        };
        let routes = match (
            &routing.logits,
            &routing.ids,
            &routing.weights,
            &routing.packed,
        ) {
            (Some(l), None, None, None) => DeviceRoutes::Logits {
                ptr: l.addr,
                dtype: l.dtype,
            },
            (None, Some(ids), Some(w), None) => {
                want(ids, DType::I32)?;
                want(w, DType::F32)?;
                DeviceRoutes::TopK {
                    ids: ids.addr,
                    weights: w.addr,
                }
            }
            (None, None, None, Some(p)) => {
                want(p, DType::I32)?;
                DeviceRoutes::Packed { ptr: p.addr }
            }
            (None, None, None, None) => {
                return Err(PyTypeError::new_err(
                    "router_logits: required for CUDA tensors (give router_logits, topk_ids + \
                     topk_weights or topk_packed; a checkpoint's router runs on the host only)",
                ))
            }
            _ => return Err(routing_forms_error()),
        };
        let call = DeviceCall {
            tokens: hidden.shape[0],
            hidden: hidden.addr,
            hidden_dtype: hidden.dtype,
            routes,
            out: out.addr,
            out_dtype: out.dtype,
        };
        py.detach(|| {
            let stream = stream as moerunner::backend::cuda::launch::RawStream;
            // SAFETY: every address is a CUDA tensor of this layer's device (checked above), of
            // the shape and dtype the call implies (checked), kept alive by the Python caller
            // while the stream runs the call (torch's caching allocator, stream-ordered);
            // `stream` is torch's current stream of that device.
            unsafe { layer.enqueue_on(&call, Some(stream)) }
        })
        .map_err(to_py)
    }
}

fn routing_forms_error() -> PyErr {
    PyTypeError::new_err(
        "routing: give exactly one of router_logits, topk_ids + topk_weights (both), topk_packed",
    )
}

#[pymethods]
impl NativeLayer {
    /// Loads a layer file (`spec/layer-file.md`), sliced for the rank when tp_size or ep_size > 1.
    #[staticmethod]
    #[pyo3(signature = (path, *, device="auto", tp_size=1, tp_rank=0, ep_size=1, ep_rank=0))]
    fn from_file(
        py: Python<'_>,
        path: PathBuf,
        device: &str,
        tp_size: usize,
        tp_rank: usize,
        ep_size: usize,
        ep_rank: usize,
    ) -> PyResult<Self> {
        let par = parallelism(tp_size, tp_rank, ep_size, ep_rank);
        let (layer, router) = py
            .detach(|| {
                par.validate()?;
                let (layer, router) = moerunner::layer_file::read_layer_with_router(&path)?;
                let layer = if par.is_single() {
                    layer
                } else {
                    moerunner::shard::shard(&layer, par)?
                };
                Ok::<_, moerunner::MoeError>((layer, router))
            })
            .map_err(to_py)?;
        Ok(NativeLayer {
            exec: load(layer, device)?,
            router: router.map(|r| Router {
                weight: r.weight,
                bias: r.linear_bias,
            }),
        })
    }

    /// Loads layer `layer` of a Hugging Face model folder; the rank reads only its slice.
    #[staticmethod]
    #[pyo3(signature = (dir, layer, *, device="auto", tp_size=1, tp_rank=0, ep_size=1, ep_rank=0, quantize=None))]
    #[allow(clippy::too_many_arguments)]
    fn from_checkpoint(
        py: Python<'_>,
        dir: PathBuf,
        layer: usize,
        device: &str,
        tp_size: usize,
        tp_rank: usize,
        ep_size: usize,
        ep_rank: usize,
        quantize: Option<&str>,
    ) -> PyResult<Self> {
        let quantize = quantize
            .map(|q| q.parse::<WeightFormat>())
            .transpose()
            .map_err(|e| PyValueError::new_err(format!("quantize: {e}")))?;
        let opts = LoadOptions {
            parallelism: parallelism(tp_size, tp_rank, ep_size, ep_rank),
            quantize,
            activation_format: None,
            quantizer: None,
            experts: None,
        };
        let loaded = py
            .detach(|| checkpoint::load_layer(&dir, layer, &opts))
            .map_err(to_py)?;
        let router = loaded.router_weight.map(|weight| Router {
            weight,
            bias: loaded.router_bias,
        });
        Ok(NativeLayer {
            exec: load(loaded.layer, device)?,
            router,
        })
    }

    /// The backend that runs the layer (`cpu`, `cuda`, `reference`).
    #[getter]
    fn backend(&self) -> &'static str {
        self.exec.loaded().backend()
    }

    /// `cpu` or `cuda:N`.
    #[getter]
    fn device(&self) -> String {
        match &self.exec {
            Exec::Host(_) => "cpu".into(),
            #[cfg(feature = "cuda")]
            Exec::Cuda { ordinal, .. } => format!("cuda:{ordinal}"),
        }
    }

    /// The layer's description as the layer file's metadata strings (without the `moerunner.`
    /// prefix), plus the sizes as ints.
    #[getter]
    fn config(&self) -> (HashMap<String, String>, usize, usize, usize, usize) {
        let c = self.layer().config();
        (
            moerunner::layer_file::layer_metadata(c)
                .into_iter()
                .map(|(k, v)| match k.strip_prefix("moerunner.") {
                    Some(short) => (short.to_string(), v),
                    None => (k, v),
                })
                .collect(),
            c.hidden,
            c.intermediate,
            c.num_experts,
            c.routing.top_k,
        )
    }

    /// Whether the layer routes hidden states itself (a checkpoint's router).
    #[getter]
    fn has_router(&self) -> bool {
        self.router.is_some()
    }

    /// Sizes the CUDA workspace for `tokens` (call before capturing a CUDA graph); nothing on
    /// the host backends.
    fn reserve(&self, py: Python<'_>, tokens: usize) -> PyResult<()> {
        match &self.exec {
            Exec::Host(_) => {
                let _ = (py, tokens);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Exec::Cuda { layer, .. } => py.detach(|| layer.reserve(tokens, false)).map_err(to_py),
        }
    }

    /// Bytes of device memory the CUDA workspace of calls of up to `tokens` tokens holds besides
    /// the weights (what `reserve(tokens)` allocates), without allocating; 0 on the host backends.
    fn workspace_bytes(&self, tokens: usize) -> usize {
        match &self.exec {
            Exec::Host(_) => {
                let _ = tokens;
                0
            }
            #[cfg(feature = "cuda")]
            Exec::Cuda { layer, .. } => layer.workspace_bytes(tokens, false),
        }
    }

    /// One forward call into `out` (same dtype and shape as `hidden_states`). `stream`: the CUDA
    /// stream handle the call runs on (torch's current stream), for CUDA tensors.
    #[pyo3(signature = (hidden_states, out, router_logits=None, topk_ids=None, topk_weights=None, topk_packed=None, stream=None))]
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        py: Python<'_>,
        hidden_states: &Bound<'_, PyAny>,
        out: &Bound<'_, PyAny>,
        router_logits: Option<&Bound<'_, PyAny>>,
        topk_ids: Option<&Bound<'_, PyAny>>,
        topk_weights: Option<&Bound<'_, PyAny>>,
        topk_packed: Option<&Bound<'_, PyAny>>,
        stream: Option<usize>,
    ) -> PyResult<()> {
        let consumer = stream.map(|s| CudaStream(s as *mut std::ffi::c_void));
        let consumer = consumer.as_ref();
        let opt = |obj: Option<&Bound<'_, PyAny>>, name| {
            obj.filter(|o| !o.is_none())
                .map(|o| import(o, name, consumer))
                .transpose()
        };
        let hidden = import(hidden_states, "hidden_states", consumer)?;
        let mut out = import(out, "out", consumer)?;
        let routing = Routing {
            logits: opt(router_logits, "router_logits")?,
            ids: opt(topk_ids, "topk_ids")?,
            weights: opt(topk_weights, "topk_weights")?,
            packed: opt(topk_packed, "topk_packed")?,
        };
        if routing.ids.is_some() != routing.weights.is_some() {
            return Err(PyTypeError::new_err(
                "topk_ids, topk_weights: give both (ids int32 [T, top_k], weights [T, top_k])",
            ));
        }
        self.check_call(&hidden, &out, &routing)?;
        match hidden.place {
            Place::Cpu => self.forward_host(py, &hidden, &mut out, &routing),
            Place::Cuda(ordinal) => {
                let stream = stream.ok_or_else(|| {
                    PyValueError::new_err(
                        "stream: required for CUDA tensors (torch's current stream)",
                    )
                })?;
                self.forward_cuda(py, &hidden, &out, &routing, ordinal, stream)
            }
        }
    }
}

impl NativeLayer {
    #[cfg(not(feature = "cuda"))]
    fn forward_cuda(
        &self,
        _py: Python<'_>,
        hidden: &View,
        _out: &View,
        _routing: &Routing,
        _ordinal: i32,
        _stream: usize,
    ) -> PyResult<()> {
        Err(arg_error(
            hidden.name,
            "is a CUDA tensor, but this build of the package has no CUDA backend".into(),
        ))
    }
}
