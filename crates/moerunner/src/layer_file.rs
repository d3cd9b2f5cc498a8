//! The `.safetensors` layer, input and output files of `spec/layer-file.md` (a stable contract:
//! names, dtypes and shapes exact). Reading memory-maps the file, so weights are borrowed, never
//! copied whole; writing goes to a temporary file that is renamed into place (atomic).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use safetensors::{Dtype, SafeTensors, View};

use crate::config::{Activation, ActivationFormat, ActivationKind, LayerConfig, Parallelism, RoutingConfig, RoutingMethod, W13Order, WeightFormat};
use crate::error::{MoeError, Result};
use crate::routing::{Routes, RoutingInput};
use crate::tensor::{Bytes, DType, HostTensor};
use crate::weights::{BlockScales, LayerWeights, MoeLayer, QuantizedTensor};

const KEY_PREFIX: &str = "moerunner.";

/// A safetensors file mapped into memory, its tensors addressable by name.
pub struct MappedFile {
    path: PathBuf,
    map: Arc<memmap2::Mmap>,
    tensors: HashMap<String, (DType, Vec<usize>, usize, usize)>,
    metadata: HashMap<String, String>,
}

fn dtype_from(d: Dtype, path: &Path, name: &str) -> Result<DType> {
    Ok(match d {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F8_E4M3 => DType::F8E4M3,
        Dtype::U8 => DType::U8,
        Dtype::I32 => DType::I32,
        other => {
            return Err(MoeError::dtype(name, "one of F32, F16, BF16, F8_E4M3, U8, I32", format!("{other:?} (in {})", path.display())))
        }
    })
}

fn dtype_to(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::F8E4M3 => Dtype::F8_E4M3,
        DType::U8 => Dtype::U8,
        DType::I32 => Dtype::I32,
    }
}

impl MappedFile {
    /// Maps and parses `path`; a truncated or malformed file is a `Format` error naming it.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| MoeError::Io { path: path.display().to_string(), source };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; a file changed underneath us by another process is outside
        // what any reader can defend against (same contract as every mmap-based loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        let bad = |why: String| MoeError::Format { path: path.display().to_string(), why };
        let st = SafeTensors::deserialize(&map).map_err(|e| bad(e.to_string()))?;
        let (_, meta) = SafeTensors::read_metadata(&map).map_err(|e| bad(e.to_string()))?;
        let base = map.as_ptr() as usize;
        let mut tensors = HashMap::new();
        for (name, view) in st.iter() {
            let dtype = dtype_from(view.dtype(), path, name)?;
            let start = view.data().as_ptr() as usize - base;
            tensors.insert(name.to_string(), (dtype, view.shape().to_vec(), start, view.data().len()));
        }
        let metadata = meta.metadata().clone().unwrap_or_default();
        Ok(MappedFile { path: path.to_path_buf(), map: Arc::new(map), tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }
    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    /// The tensor `name`, borrowed from the map, or None if absent.
    pub fn get(&self, name: &str) -> Option<HostTensor> {
        let (dtype, shape, start, len) = self.tensors.get(name)?.clone();
        Some(HostTensor { dtype, shape, bytes: Bytes::Mapped { map: self.map.clone(), start, len } })
    }
    pub fn require(&self, name: &str) -> Result<HostTensor> {
        self.get(name).ok_or_else(|| MoeError::missing(format!("tensor `{name}` in {}", self.path.display())))
    }
}

struct TensorRef<'a>(&'a HostTensor);

impl View for TensorRef<'_> {
    fn dtype(&self) -> Dtype {
        dtype_to(self.0.dtype)
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.0.bytes)
    }
    fn data_len(&self) -> usize {
        self.0.bytes.len()
    }
}

/// Writes named tensors and metadata to `path` atomically: a temp file beside it, then rename.
pub fn write_tensors(path: &Path, tensors: &[(String, HostTensor)], metadata: HashMap<String, String>) -> Result<()> {
    let io = |source| MoeError::Io { path: path.display().to_string(), source };
    let file_name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    let views: Vec<(&str, TensorRef)> = tensors.iter().map(|(n, t)| (n.as_str(), TensorRef(t))).collect();
    let meta = if metadata.is_empty() { None } else { Some(metadata) };
    if let Err(e) = safetensors::serialize_to_file(views, meta, &tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(MoeError::Format { path: path.display().to_string(), why: format!("could not write: {e}") });
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        io(e)
    })
}

// ---------------------------------------------------------------------------------------------
// Layer files

fn key<'a>(meta: &'a HashMap<String, String>, k: &str) -> Option<&'a str> {
    meta.get(&format!("{KEY_PREFIX}{k}")).map(|s| s.as_str())
}

fn required<'a>(meta: &'a HashMap<String, String>, k: &str) -> Result<&'a str> {
    key(meta, k).ok_or_else(|| MoeError::missing(format!("metadata key `{KEY_PREFIX}{k}`")))
}

fn parse_named<T: FromStr<Err = MoeError>>(meta: &HashMap<String, String>, k: &str) -> Result<T> {
    required(meta, k)?.parse().map_err(|e: MoeError| MoeError::invalid(format!("metadata key `{KEY_PREFIX}{k}`"), e.to_string()))
}

fn parse_num<T: FromStr>(meta: &HashMap<String, String>, k: &str, default: Option<T>) -> Result<T> {
    match (key(meta, k), default) {
        (None, Some(d)) => Ok(d),
        (None, None) => Err(MoeError::missing(format!("metadata key `{KEY_PREFIX}{k}`"))),
        (Some(s), _) => s.trim().parse().map_err(|_| MoeError::invalid(format!("metadata key `{KEY_PREFIX}{k}`"), format!("`{s}` is not a valid number"))),
    }
}

fn finite(k: &str, v: f32) -> Result<f32> {
    if v.is_finite() { Ok(v) } else { Err(MoeError::invalid(format!("metadata key `{KEY_PREFIX}{k}`"), format!("must be finite, got {v}"))) }
}

/// The layer config a file's metadata and tensor shapes describe (no weights are read).
pub fn read_layer_config(file: &MappedFile) -> Result<LayerConfig> {
    let meta = file.metadata();
    let version = required(meta, "version")?;
    if version != "1" {
        return Err(MoeError::invalid(format!("metadata key `{KEY_PREFIX}version`"), format!("unsupported version `{version}` (this build reads 1)")));
    }
    let weight_format: WeightFormat = parse_named(meta, "weight_format")?;
    let activation_format: ActivationFormat = parse_named(meta, "activation_format")?;
    let kind: ActivationKind = parse_named(meta, "activation")?;
    let activation = match kind {
        ActivationKind::Swiglu => Activation::Swiglu,
        ActivationKind::Geglu => Activation::Geglu,
        ActivationKind::Relu2 => Activation::Relu2,
        ActivationKind::SwigluOai => Activation::SwigluOai {
            alpha: finite("swiglu_alpha", parse_num(meta, "swiglu_alpha", Some(1.702))?)?,
            beta: finite("swiglu_beta", parse_num(meta, "swiglu_beta", Some(1.0))?)?,
            limit: {
                let l: f32 = parse_num(meta, "swiglu_limit", Some(7.0))?;
                if l.is_nan() || l <= 0.0 {
                    return Err(MoeError::invalid(format!("metadata key `{KEY_PREFIX}swiglu_limit`"), format!("must be positive, got {l}")));
                }
                l
            },
        },
    };
    let w13_order = if activation.is_gated() { parse_named(meta, "w13_order")? } else { W13Order::GateUp };
    let method: RoutingMethod = parse_named(meta, "routing")?;
    let top_k: usize = parse_num(meta, "top_k", None)?;
    let routing = RoutingConfig {
        method,
        top_k,
        n_group: parse_num(meta, "n_group", Some(1))?,
        topk_group: parse_num(meta, "topk_group", Some(1))?,
        routed_scaling_factor: finite("routed_scaling_factor", parse_num(meta, "routed_scaling_factor", Some(1.0))?)?,
        norm_topk_prob: match key(meta, "norm_topk_prob") {
            None | Some("true") => true,
            Some("false") => false,
            Some(other) => return Err(MoeError::invalid(format!("metadata key `{KEY_PREFIX}norm_topk_prob`"), format!("`{other}` is not `true` or `false`"))),
        },
    };
    // E, H, I from the weight shapes; 4-bit formats pack two elements per byte along K.
    let pack = if weight_format.is_fp4() { 2 } else { 1 };
    let (w13_dims, w2_dims) = (dims3(file, "w13")?, dims3(file, "w2")?);
    let (e, m, h) = (w13_dims[0], w13_dims[1], w13_dims[2] * pack);
    let i = w2_dims[2] * pack;
    if w2_dims[0] != e || w2_dims[1] != h {
        return Err(MoeError::shape("w2", format!("[{e}, {h}, I{}] (E and H of w13)", if pack == 2 { "/2" } else { "" }), &w2_dims));
    }
    let want_m = if activation.is_gated() { 2 * i } else { i };
    if m != want_m {
        return Err(MoeError::shape("w13", format!("[{e}, {want_m}, ..] (M = {} for {} with I = {i} from w2)", if activation.is_gated() { "2I" } else { "I" }, activation.kind()), &w13_dims));
    }
    let config = LayerConfig {
        num_experts: e,
        hidden: h,
        intermediate: i,
        weight_format,
        activation_format,
        activation,
        w13_order,
        routing,
        local_experts: 0..e,
        parallelism: Parallelism::default(),
    };
    config.validate()?;
    Ok(config)
}

fn dims3(file: &MappedFile, name: &str) -> Result<Vec<usize>> {
    let t = file.require(name)?;
    if t.shape.len() != 3 {
        return Err(MoeError::shape(name, "[E, rows, cols]", &t.shape));
    }
    Ok(t.shape)
}

/// The element dtype a weight format stores.
fn element_dtype(f: WeightFormat) -> DType {
    match f {
        WeightFormat::Bf16 => DType::BF16,
        WeightFormat::Fp8 | WeightFormat::Fp8Block | WeightFormat::Mxfp8 => DType::F8E4M3,
        WeightFormat::Mxfp4 | WeightFormat::Nvfp4 => DType::U8,
    }
}

/// The scale tensor's dtype and shape for a projection `[e, rows, cols]`.
fn scale_spec(f: WeightFormat, e: usize, rows: usize, cols: usize) -> Option<(DType, Vec<usize>)> {
    match f {
        WeightFormat::Bf16 => None,
        WeightFormat::Fp8 => Some((DType::F32, vec![e])),
        WeightFormat::Fp8Block => Some((DType::F32, vec![e, rows.div_ceil(128), cols.div_ceil(128)])),
        WeightFormat::Mxfp8 | WeightFormat::Mxfp4 => Some((DType::U8, vec![e, rows, cols / 32])),
        WeightFormat::Nvfp4 => Some((DType::F8E4M3, vec![e, rows, cols / 16])),
    }
}

fn f32s(t: &HostTensor, name: &str) -> Result<Vec<f32>> {
    t.to_f32_vec(name)
}

fn read_projection(file: &MappedFile, name: &str, f: WeightFormat, e: usize, rows: usize, cols: usize) -> Result<QuantizedTensor> {
    let data = file.require(name)?;
    data.expect_dtype(name, &[element_dtype(f)])?;
    let packed_cols = if f.is_fp4() { cols / 2 } else { cols };
    data.expect_shape(name, &[e, rows, packed_cols])?;
    let sname = format!("{name}_scale");
    let scales = match scale_spec(f, e, rows, cols) {
        None => {
            if file.has(&sname) {
                return Err(MoeError::invalid(format!("tensor `{sname}`"), "bf16 weights take no scale"));
            }
            BlockScales::None
        }
        Some((dtype, shape)) => {
            let s = file.require(&sname)?;
            s.expect_dtype(&sname, &[dtype])?;
            s.expect_shape(&sname, &shape)?;
            match f {
                WeightFormat::Fp8 => BlockScales::PerExpert(f32s(&s, &sname)?),
                WeightFormat::Fp8Block => BlockScales::Block128(f32s(&s, &sname)?),
                WeightFormat::Mxfp8 | WeightFormat::Mxfp4 => BlockScales::Ue8m0(s.bytes.to_vec()),
                _ => BlockScales::E4m3(s.bytes.to_vec()),
            }
        }
    };
    let gname = format!("{name}_global_scale");
    let global_scales = if f == WeightFormat::Nvfp4 {
        let g = file.require(&gname)?;
        g.expect_dtype(&gname, &[DType::F32])?;
        g.expect_shape(&gname, &[e])?;
        f32s(&g, &gname)?
    } else {
        if file.has(&gname) {
            return Err(MoeError::invalid(format!("tensor `{gname}`"), format!("only nvfp4 weights take a global scale, not {f}")));
        }
        Vec::new()
    };
    Ok(QuantizedTensor { format: f, experts: e, rows, cols, data: data.bytes, scales, global_scales })
}

fn read_optional_vec(file: &MappedFile, name: &str, shape: &[usize], dtypes: &[DType]) -> Result<Option<Vec<f32>>> {
    let Some(t) = file.get(name) else { return Ok(None) };
    t.expect_dtype(name, dtypes)?;
    t.expect_shape(name, shape)?;
    Ok(Some(f32s(&t, name)?))
}

const LAYER_TENSORS: &[&str] = &[
    "w13", "w2", "w13_scale", "w2_scale", "w13_global_scale", "w2_global_scale", "w13_input_scale",
    "w2_input_scale", "w13_bias", "w2_bias", "router_bias",
];

/// Reads and validates a layer file (memory-mapped; expert weights stay borrowed from the map).
pub fn read_layer(path: &Path) -> Result<MoeLayer> {
    let file = MappedFile::open(path)?;
    if let Some(unknown) = file.names().find(|n| !LAYER_TENSORS.contains(n)) {
        return Err(MoeError::invalid(format!("tensor `{unknown}`"), format!("is not part of a layer file; known: {}", LAYER_TENSORS.join(", "))));
    }
    let config = read_layer_config(&file)?;
    let (e, m, h, i, f) = (config.num_experts, config.w13_rows(), config.hidden, config.intermediate, config.weight_format);
    let w13 = read_projection(&file, "w13", f, e, m, h)?;
    let w2 = read_projection(&file, "w2", f, e, h, i)?;
    let bias_dtypes = [DType::F32, DType::BF16];
    let input_scale = |name: &str| -> Result<Option<f32>> {
        let Some(t) = file.get(name) else { return Ok(None) };
        t.expect_dtype(name, &[DType::F32])?;
        t.expect_shape(name, &[])?;
        Ok(f32s(&t, name)?.first().copied())
    };
    let weights = LayerWeights {
        w13,
        w2,
        w13_bias: read_optional_vec(&file, "w13_bias", &[e, m], &bias_dtypes)?,
        w2_bias: read_optional_vec(&file, "w2_bias", &[e, h], &bias_dtypes)?,
        w13_input_scale: input_scale("w13_input_scale")?,
        w2_input_scale: input_scale("w2_input_scale")?,
        router_bias: read_optional_vec(&file, "router_bias", &[config.num_experts], &[DType::F32])?,
    };
    MoeLayer::new(config, weights)
}

/// The metadata keys of a layer config.
pub fn layer_metadata(c: &LayerConfig) -> HashMap<String, String> {
    let mut m = HashMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("{KEY_PREFIX}{k}"), v);
    };
    put("version", "1".into());
    put("weight_format", c.weight_format.to_string());
    put("activation_format", c.activation_format.to_string());
    put("activation", c.activation.kind().to_string());
    if let Activation::SwigluOai { alpha, beta, limit } = c.activation {
        put("swiglu_alpha", alpha.to_string());
        put("swiglu_beta", beta.to_string());
        put("swiglu_limit", limit.to_string());
    }
    if c.activation.is_gated() {
        put("w13_order", c.w13_order.to_string());
    }
    put("routing", c.routing.method.to_string());
    put("top_k", c.routing.top_k.to_string());
    if c.routing.method == RoutingMethod::DeepseekV3 {
        put("n_group", c.routing.n_group.to_string());
        put("topk_group", c.routing.topk_group.to_string());
    }
    put("routed_scaling_factor", c.routing.routed_scaling_factor.to_string());
    put("norm_topk_prob", c.routing.norm_topk_prob.to_string());
    m
}

fn projection_tensors(name: &str, t: &QuantizedTensor, out: &mut Vec<(String, HostTensor)>) {
    let packed_cols = if t.format.is_fp4() { t.cols / 2 } else { t.cols };
    let shape = vec![t.experts, t.rows, packed_cols];
    out.push((name.into(), HostTensor { dtype: element_dtype(t.format), shape, bytes: t.data.clone() }));
    let (dtype, shape) = match scale_spec(t.format, t.experts, t.rows, t.cols) {
        Some(s) => s,
        None => return,
    };
    let bytes: Vec<u8> = match &t.scales {
        BlockScales::None => return,
        BlockScales::PerExpert(s) | BlockScales::Block128(s) => s.iter().flat_map(|v| v.to_le_bytes()).collect(),
        BlockScales::Ue8m0(b) | BlockScales::E4m3(b) => b.clone(),
    };
    out.push((format!("{name}_scale"), HostTensor::from_u8(dtype, shape, bytes)));
    if t.format == WeightFormat::Nvfp4 {
        out.push((format!("{name}_global_scale"), HostTensor::from_f32(vec![t.experts], &t.global_scales)));
    }
}

/// Writes a layer file atomically. The layer must hold all experts (an EP/TP shard is not a layer
/// file: its ids and I would not describe a whole layer).
pub fn write_layer(path: &Path, layer: &MoeLayer) -> Result<()> {
    let (c, w) = (layer.config(), layer.weights());
    if c.local_experts != (0..c.num_experts) || !c.parallelism.is_single() {
        return Err(MoeError::invalid("write_layer", "a sharded layer (EP/TP rank) cannot be written as a layer file"));
    }
    let mut tensors = Vec::new();
    projection_tensors("w13", &w.w13, &mut tensors);
    projection_tensors("w2", &w.w2, &mut tensors);
    let (e, m, h) = (c.num_experts, c.w13_rows(), c.hidden);
    for (name, v, shape) in [("w13_bias", &w.w13_bias, vec![e, m]), ("w2_bias", &w.w2_bias, vec![e, h]), ("router_bias", &w.router_bias, vec![c.num_experts])] {
        if let Some(v) = v {
            tensors.push((name.to_string(), HostTensor::from_f32(shape, v)));
        }
    }
    for (name, s) in [("w13_input_scale", w.w13_input_scale), ("w2_input_scale", w.w2_input_scale)] {
        if let Some(s) = s {
            tensors.push((name.to_string(), HostTensor::from_f32(vec![], &[s])));
        }
    }
    write_tensors(path, &tensors, layer_metadata(c))
}

// ---------------------------------------------------------------------------------------------
// Input and output files

/// The routing source of an input file.
#[derive(Clone, Debug)]
pub enum RoutingTensors {
    Logits(HostTensor),
    TopK { ids: HostTensor, weights: HostTensor },
    Packed(HostTensor),
}

/// An input file: hidden states and exactly one routing source.
#[derive(Clone, Debug)]
pub struct InputFile {
    pub hidden: HostTensor,
    pub routing: RoutingTensors,
}

impl InputFile {
    pub fn routing_input(&self) -> RoutingInput<'_> {
        match &self.routing {
            RoutingTensors::Logits(l) => RoutingInput::Logits(l),
            RoutingTensors::TopK { ids, weights } => RoutingInput::TopK { ids, weights },
            RoutingTensors::Packed(p) => RoutingInput::Packed(p),
        }
    }
    pub fn tokens(&self) -> usize {
        self.hidden.shape.first().copied().unwrap_or(0)
    }
}

const INPUT_TENSORS: &[&str] = &["hidden_states", "router_logits", "topk_ids", "topk_weights", "topk_packed"];

/// Reads an input file: dtypes checked here, shapes against the layer when it runs.
pub fn read_input(path: &Path) -> Result<InputFile> {
    let file = MappedFile::open(path)?;
    if let Some(unknown) = file.names().find(|n| !INPUT_TENSORS.contains(n)) {
        return Err(MoeError::invalid(format!("tensor `{unknown}`"), format!("is not part of an input file; known: {}", INPUT_TENSORS.join(", "))));
    }
    let hidden = file.require("hidden_states")?;
    hidden.expect_dtype("hidden_states", &[DType::BF16, DType::F16, DType::F32])?;
    if hidden.shape.len() != 2 {
        return Err(MoeError::shape("hidden_states", "[T, H]", &hidden.shape));
    }
    let sources = [file.has("router_logits"), file.has("topk_ids") || file.has("topk_weights"), file.has("topk_packed")];
    if sources.iter().filter(|&&s| s).count() != 1 {
        let found: Vec<&str> = ["router_logits", "topk_ids/topk_weights", "topk_packed"]
            .into_iter()
            .zip(sources)
            .filter_map(|(n, present)| present.then_some(n))
            .collect();
        return Err(MoeError::invalid(format!("input file {}", path.display()), format!(
            "needs exactly one routing source: `router_logits`, `topk_ids` + `topk_weights`, or `topk_packed` (found: {})",
            if found.is_empty() { "none".to_string() } else { found.join(", ") })));
    }
    let routing = if let Some(l) = file.get("router_logits") {
        RoutingTensors::Logits(l)
    } else if let Some(p) = file.get("topk_packed") {
        RoutingTensors::Packed(p)
    } else {
        RoutingTensors::TopK { ids: file.require("topk_ids")?, weights: file.require("topk_weights")? }
    };
    Ok(InputFile { hidden, routing })
}

/// Writes an input file atomically.
pub fn write_input(path: &Path, input: &InputFile) -> Result<()> {
    let mut tensors = vec![("hidden_states".to_string(), input.hidden.clone())];
    match &input.routing {
        RoutingTensors::Logits(l) => tensors.push(("router_logits".into(), l.clone())),
        RoutingTensors::TopK { ids, weights } => {
            tensors.push(("topk_ids".into(), ids.clone()));
            tensors.push(("topk_weights".into(), weights.clone()));
        }
        RoutingTensors::Packed(p) => tensors.push(("topk_packed".into(), p.clone())),
    }
    write_tensors(path, &tensors, HashMap::new())
}

/// Writes an output file atomically: `output`, plus `topk_ids` I32 / `topk_weights` F32 `[T, k]`
/// when `routes` is given (`--save-routing`).
pub fn write_output(path: &Path, output: &HostTensor, routes: Option<&Routes>) -> Result<()> {
    let mut tensors = vec![("output".to_string(), output.clone())];
    if let Some(r) = routes {
        tensors.push(("topk_ids".into(), HostTensor::from_i32(vec![r.tokens, r.top_k], &r.ids)));
        tensors.push(("topk_weights".into(), HostTensor::from_f32(vec![r.tokens, r.top_k], &r.weights)));
    }
    write_tensors(path, &tensors, HashMap::new())
}

/// Reads an output file's tensors (for tests and tools): `output` and, if saved, the routing.
pub fn read_output(path: &Path) -> Result<(HostTensor, Option<(HostTensor, HostTensor)>)> {
    let file = MappedFile::open(path)?;
    let out = file.require("output")?;
    let routes = match (file.get("topk_ids"), file.get("topk_weights")) {
        (Some(i), Some(w)) => Some((i, w)),
        _ => None,
    };
    Ok((out, routes))
}
