//! The layer file: `moerunner.*` metadata ↔ [`LayerConfig`], named tensors ↔ [`LayerWeights`].
//!
//! Decisions where `spec/layer-file.md` is silent:
//! - E, H and I come from the shapes of `w13` and `w2` (I from w2's last dim, ×2 for 4-bit), so the
//!   metadata cannot contradict the tensors; every other rule is [`crate::validate`]'s.
//! - An unknown `moerunner.*` key is refused (a misspelt optional key would otherwise silently fall
//!   back to its default); keys of other namespaces are ignored.
//! - A key that does not apply (e.g. `n_group` for `renormalize`) is still parsed, so garbage is
//!   refused, and kept in the config; the writer emits the keys that apply plus any that differ from
//!   their default, so a config round-trips exactly.

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

use super::{write_tensors, MappedFile};
use crate::config::{
    Activation, ActivationFormat, ActivationKind, LayerConfig, Parallelism, RoutingConfig,
    RoutingMethod, W13Order, WeightFormat,
};
use crate::error::{MoeError, Result};
use crate::tensor::{DType, HostTensor};
use crate::weights::{BlockScales, LayerWeights, MoeLayer, QuantizedTensor};

const PREFIX: &str = "moerunner.";

/// Every metadata key of a layer file, without the `moerunner.` prefix.
pub const METADATA_KEYS: &[&str] = &[
    "version",
    "weight_format",
    "activation_format",
    "activation",
    "swiglu_alpha",
    "swiglu_beta",
    "swiglu_limit",
    "w13_order",
    "routing",
    "top_k",
    "n_group",
    "topk_group",
    "routed_scaling_factor",
    "norm_topk_prob",
];

/// Every tensor a layer file may hold.
const LAYER_TENSORS: &[&str] = &[
    "w13",
    "w2",
    "w13_scale",
    "w2_scale",
    "w13_global_scale",
    "w2_global_scale",
    "w13_input_scale",
    "w2_input_scale",
    "w13_bias",
    "w2_bias",
    "router_bias",
    "router_weight",
    "router_linear_bias",
];

/// The router a layer file may carry (`router_weight` F32 or BF16 `[E, H]`, `router_linear_bias`
/// F32 `[E]`), so that an input of hidden states alone can be routed as the checkpoint's model
/// routes it. Not in `spec/layer-file.md` (which has routing come from the input): an optional
/// extension `convert` writes and `run` reads; a file without it is what the spec describes.
#[derive(Clone, Debug)]
pub struct Router {
    pub weight: HostTensor,
    /// GPT-OSS's linear bias of the router, added to the logits (not a selection bias: those are
    /// the layer's `router_bias`).
    pub linear_bias: Option<Vec<f32>>,
}

const DEFAULT_OAI: (f32, f32, f32) = (1.702, 1.0, 7.0);

/// Typed access to the `moerunner.*` keys; every error names the full key.
struct Meta<'a>(&'a HashMap<String, String>);

impl Meta<'_> {
    fn what(k: &str) -> String {
        format!("metadata key `{PREFIX}{k}`")
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.get(&format!("{PREFIX}{k}")).map(|s| s.as_str())
    }
    fn required(&self, k: &str) -> Result<&str> {
        self.get(k).ok_or_else(|| MoeError::missing(Self::what(k)))
    }
    /// One of the spec's names (`FromStr` of the config enums lists the legal values).
    fn name<T: FromStr<Err = MoeError>>(&self, k: &str, default: Option<T>) -> Result<T> {
        match (self.get(k), default) {
            (None, Some(d)) => Ok(d),
            (None, None) => Err(MoeError::missing(Self::what(k))),
            (Some(s), _) => s
                .parse()
                .map_err(|e: MoeError| MoeError::invalid(Self::what(k), e.to_string())),
        }
    }
    fn number<T: FromStr>(&self, k: &str, default: Option<T>) -> Result<T> {
        match (self.get(k), default) {
            (None, Some(d)) => Ok(d),
            (None, None) => Err(MoeError::missing(Self::what(k))),
            (Some(s), _) => s.trim().parse().map_err(|_| {
                MoeError::invalid(Self::what(k), format!("`{s}` is not a valid number"))
            }),
        }
    }
    fn finite(&self, k: &str, default: f32) -> Result<f32> {
        let v: f32 = self.number(k, Some(default))?;
        if v.is_finite() {
            Ok(v)
        } else {
            Err(MoeError::invalid(
                Self::what(k),
                format!("must be finite, got {v}"),
            ))
        }
    }
    fn boolean(&self, k: &str, default: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(default),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(other) => Err(MoeError::invalid(
                Self::what(k),
                format!("`{other}` is not `true` or `false`"),
            )),
        }
    }
}

/// The element dtype a weight format stores.
fn element_dtype(f: WeightFormat) -> DType {
    match f {
        WeightFormat::Bf16 => DType::BF16,
        WeightFormat::Fp8 | WeightFormat::Fp8Block | WeightFormat::Mxfp8 => DType::F8E4M3,
        WeightFormat::Mxfp4 | WeightFormat::Nvfp4 => DType::U8,
    }
}

/// The stored last dim of a projection with `cols` logical columns (two 4-bit elements a byte).
fn stored_cols(f: WeightFormat, cols: usize) -> usize {
    if f.is_fp4() {
        cols / 2
    } else {
        cols
    }
}

/// The scale tensor's dtype and shape for a projection `[e, rows, cols]` (`spec/formats.md`).
fn scale_spec(f: WeightFormat, e: usize, rows: usize, cols: usize) -> Option<(DType, Vec<usize>)> {
    match f {
        WeightFormat::Bf16 => None,
        WeightFormat::Fp8 => Some((DType::F32, vec![e])),
        WeightFormat::Fp8Block => {
            Some((DType::F32, vec![e, rows.div_ceil(128), cols.div_ceil(128)]))
        }
        WeightFormat::Mxfp8 | WeightFormat::Mxfp4 => Some((DType::U8, vec![e, rows, cols / 32])),
        WeightFormat::Nvfp4 => Some((DType::F8E4M3, vec![e, rows, cols / 16])),
    }
}

/// The stored `[E, rows, cols]` of `w13` or `w2`, after checking its dtype against the format.
fn weight_dims(file: &MappedFile, name: &str, f: WeightFormat) -> Result<[usize; 3]> {
    let (dtype, shape) = file.info(name).ok_or_else(|| {
        MoeError::missing(format!("tensor `{name}` in {}", file.path().display()))
    })?;
    let want = element_dtype(f);
    if dtype != want {
        return Err(MoeError::dtype(
            name,
            format!("{want} (weight format {f})"),
            dtype,
        ));
    }
    match *shape {
        [e, rows, cols] => Ok([e, rows, cols]),
        _ => Err(MoeError::shape(name, "[E, rows, cols]", shape)),
    }
}

/// The layer config a file's metadata and tensor shapes describe. Reads no tensor data.
pub fn read_layer_config(file: &MappedFile) -> Result<LayerConfig> {
    let raw = file.metadata();
    let mut unknown: Vec<&str> = raw
        .keys()
        .filter_map(|k| k.strip_prefix(PREFIX))
        .filter(|k| !METADATA_KEYS.contains(k))
        .collect();
    unknown.sort();
    if let Some(k) = unknown.first() {
        return Err(MoeError::invalid(
            Meta::what(k),
            format!(
                "is not a layer-file key; known: {}",
                METADATA_KEYS.join(", ")
            ),
        ));
    }
    let meta = Meta(raw);
    let version = meta.required("version")?;
    if version != "1" {
        return Err(MoeError::invalid(
            Meta::what("version"),
            format!("unsupported version `{version}` (this build reads 1)"),
        ));
    }
    let weight_format: WeightFormat = meta.name("weight_format", None)?;
    let activation_format: ActivationFormat = meta.name("activation_format", None)?;
    let kind: ActivationKind = meta.name("activation", None)?;
    let (alpha, beta) = (
        meta.finite("swiglu_alpha", DEFAULT_OAI.0)?,
        meta.finite("swiglu_beta", DEFAULT_OAI.1)?,
    );
    // +inf is a legal limit (no clamping: swiglu_oai then equals swiglu for α = 1, β = 0).
    let limit: f32 = meta.number("swiglu_limit", Some(DEFAULT_OAI.2))?;
    if limit.is_nan() || limit <= 0.0 {
        return Err(MoeError::invalid(
            Meta::what("swiglu_limit"),
            format!("must be positive, got {limit}"),
        ));
    }
    let activation = match kind {
        ActivationKind::Swiglu => Activation::Swiglu,
        ActivationKind::Geglu => Activation::Geglu,
        ActivationKind::Relu2 => Activation::Relu2,
        ActivationKind::SwigluOai => Activation::SwigluOai { alpha, beta, limit },
    };
    // Gated layers must say their row order (checkpoints disagree); non-gated ones have none.
    let w13_order = meta.name(
        "w13_order",
        (!activation.is_gated()).then_some(W13Order::GateUp),
    )?;
    let routing = RoutingConfig {
        method: meta.name("routing", None)?,
        top_k: meta.number("top_k", None)?,
        n_group: meta.number("n_group", Some(1))?,
        topk_group: meta.number("topk_group", Some(1))?,
        routed_scaling_factor: meta.finite("routed_scaling_factor", 1.0)?,
        norm_topk_prob: meta.boolean("norm_topk_prob", true)?,
    };

    let [e, m, h_stored] = weight_dims(file, "w13", weight_format)?;
    let w2 = weight_dims(file, "w2", weight_format)?;
    let pack = if weight_format.is_fp4() { 2 } else { 1 };
    let (h, i) = (h_stored * pack, w2[2] * pack);
    if w2[0] != e || w2[1] != h {
        let last = if pack == 2 { "I/2" } else { "I" };
        return Err(MoeError::shape(
            "w2",
            format!(
                "[{e}, {h}, {last}] (E and H from w13 {:?})",
                [e, m, h_stored]
            ),
            &w2,
        ));
    }
    let want_m = if activation.is_gated() { 2 * i } else { i };
    if m != want_m {
        let rule = if activation.is_gated() { "2I" } else { "I" };
        return Err(MoeError::shape(
            "w13",
            format!(
                "[{e}, {want_m}, {h_stored}] (M = {rule} for {} with I = {i} from w2)",
                activation.kind()
            ),
            &[e, m, h_stored],
        ));
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

/// The config of the layer file at `path` without reading its weights (for `make-input`, `info`).
pub fn read_layer_header(path: &Path) -> Result<LayerConfig> {
    read_layer_config(&MappedFile::open(path)?)
}

fn read_projection(
    file: &MappedFile,
    name: &str,
    f: WeightFormat,
    e: usize,
    rows: usize,
    cols: usize,
) -> Result<QuantizedTensor> {
    let data = file.require(name)?;
    data.expect_dtype(name, &[element_dtype(f)])?;
    data.expect_shape(name, &[e, rows, stored_cols(f, cols)])?;
    let sname = format!("{name}_scale");
    let scales = match scale_spec(f, e, rows, cols) {
        None => {
            if file.has(&sname) {
                return Err(MoeError::invalid(
                    format!("tensor `{sname}`"),
                    "bf16 weights take no scale",
                ));
            }
            BlockScales::None
        }
        Some((dtype, shape)) => {
            let s = file.require(&sname)?;
            s.expect_dtype(&sname, &[dtype])?;
            s.expect_shape(&sname, &shape)?;
            // Scales are small (≤ 1/16 of the data): copied, so validation and backends get plain
            // vectors; the element data stays borrowed from the map.
            match f {
                WeightFormat::Fp8 => BlockScales::PerExpert(s.to_f32_vec(&sname)?),
                WeightFormat::Fp8Block => BlockScales::Block128(s.to_f32_vec(&sname)?),
                WeightFormat::Mxfp8 | WeightFormat::Mxfp4 => BlockScales::Ue8m0(s.bytes.to_vec()),
                WeightFormat::Nvfp4 | WeightFormat::Bf16 => BlockScales::E4m3(s.bytes.to_vec()),
            }
        }
    };
    let gname = format!("{name}_global_scale");
    let global_scales = if f == WeightFormat::Nvfp4 {
        let g = file.require(&gname)?;
        g.expect_dtype(&gname, &[DType::F32])?;
        g.expect_shape(&gname, &[e])?;
        g.to_f32_vec(&gname)?
    } else {
        if file.has(&gname) {
            return Err(MoeError::invalid(
                format!("tensor `{gname}`"),
                format!("only nvfp4 weights take a global scale, not {f}"),
            ));
        }
        Vec::new()
    };
    Ok(QuantizedTensor {
        format: f,
        experts: e,
        rows,
        cols,
        data: data.bytes,
        scales,
        global_scales,
    })
}

/// An optional F32 (or BF16, decoded exactly) vector tensor of `shape`.
fn read_optional_vec(
    file: &MappedFile,
    name: &str,
    shape: &[usize],
    dtypes: &[DType],
) -> Result<Option<Vec<f32>>> {
    let Some(t) = file.get(name) else {
        return Ok(None);
    };
    t.expect_dtype(name, dtypes)?;
    t.expect_shape(name, shape)?;
    Ok(Some(t.to_f32_vec(name)?))
}

/// An optional F32 scalar (shape `[]`).
fn read_optional_scalar(file: &MappedFile, name: &str) -> Result<Option<f32>> {
    let Some(t) = file.get(name) else {
        return Ok(None);
    };
    t.expect_dtype(name, &[DType::F32])?;
    t.expect_shape(name, &[])?;
    Ok(t.to_f32_vec(name)?.first().copied())
}

/// The router a layer file carries, if any, checked against its E and H: a weight of finite
/// values, and a linear bias only beside a weight.
pub fn read_layer_router(path: &Path) -> Result<Option<Router>> {
    let file = MappedFile::open(path)?;
    let config = read_layer_config(&file)?;
    router_of(&file, &config)
}

/// [`read_layer`] and [`read_layer_router`] from one opening of the file.
pub fn read_layer_with_router(path: &Path) -> Result<(MoeLayer, Option<Router>)> {
    let file = MappedFile::open(path)?;
    let layer = layer_of(&file)?;
    let router = router_of(&file, layer.config())?;
    Ok((layer, router))
}

fn router_of(file: &MappedFile, config: &LayerConfig) -> Result<Option<Router>> {
    let (e, h) = (config.num_experts, config.hidden);
    let linear_bias = read_optional_vec(file, "router_linear_bias", &[e], &[DType::F32])?;
    let Some(weight) = file.get("router_weight") else {
        if linear_bias.is_some() {
            return Err(MoeError::invalid(
                "tensor `router_linear_bias`",
                "a router bias without `router_weight`",
            ));
        }
        return Ok(None);
    };
    weight.expect_dtype("router_weight", &[DType::F32, DType::BF16])?;
    weight.expect_shape("router_weight", &[e, h])?;
    let values = weight.to_f32_vec("router_weight")?;
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return Err(MoeError::invalid(
            "tensor `router_weight`",
            format!(
                "element [{}, {}] is {}, not a finite number",
                i / h.max(1),
                i % h.max(1),
                values[i]
            ),
        ));
    }
    if let Some(i) = linear_bias
        .as_ref()
        .and_then(|b| b.iter().position(|v| !v.is_finite()))
    {
        return Err(MoeError::invalid(
            "tensor `router_linear_bias`",
            format!("element [{i}] is not a finite number"),
        ));
    }
    Ok(Some(Router {
        weight,
        linear_bias,
    }))
}

/// Reads and validates a layer file. The expert weights stay borrowed from the memory map.
pub fn read_layer(path: &Path) -> Result<MoeLayer> {
    layer_of(&MappedFile::open(path)?)
}

fn layer_of(file: &MappedFile) -> Result<MoeLayer> {
    file.expect_only(LAYER_TENSORS, "a layer file")?;
    let config = read_layer_config(file)?;
    let (e, m, h, i, f) = (
        config.num_experts,
        config.w13_rows(),
        config.hidden,
        config.intermediate,
        config.weight_format,
    );
    let bias_dtypes = [DType::F32, DType::BF16];
    let weights = LayerWeights {
        w13: read_projection(file, "w13", f, e, m, h)?,
        w2: read_projection(file, "w2", f, e, h, i)?,
        w13_bias: read_optional_vec(file, "w13_bias", &[e, m], &bias_dtypes)?,
        w2_bias: read_optional_vec(file, "w2_bias", &[e, h], &bias_dtypes)?,
        w13_input_scale: read_optional_scalar(file, "w13_input_scale")?,
        w2_input_scale: read_optional_scalar(file, "w2_input_scale")?,
        router_bias: read_optional_vec(file, "router_bias", &[e], &[DType::F32])?,
    };
    MoeLayer::new(config, weights)
}

/// The `moerunner.*` metadata of a config: every key that applies, plus any key that differs from
/// its default (so reading the file back gives an equal config).
pub fn layer_metadata(c: &LayerConfig) -> HashMap<String, String> {
    let mut m = HashMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("{PREFIX}{k}"), v);
    };
    put("version", "1".into());
    put("weight_format", c.weight_format.to_string());
    put("activation_format", c.activation_format.to_string());
    put("activation", c.activation.kind().to_string());
    if let Activation::SwigluOai { alpha, beta, limit } = c.activation {
        // f32's Display is the shortest string that parses back to the same value.
        put("swiglu_alpha", alpha.to_string());
        put("swiglu_beta", beta.to_string());
        put("swiglu_limit", limit.to_string());
    }
    if c.activation.is_gated() || c.w13_order != W13Order::GateUp {
        put("w13_order", c.w13_order.to_string());
    }
    let r = &c.routing;
    put("routing", r.method.to_string());
    put("top_k", r.top_k.to_string());
    if r.method == RoutingMethod::DeepseekV3 || r.n_group != 1 || r.topk_group != 1 {
        put("n_group", r.n_group.to_string());
        put("topk_group", r.topk_group.to_string());
    }
    if matches!(
        r.method,
        RoutingMethod::DeepseekV3 | RoutingMethod::Minimax2
    ) || r.routed_scaling_factor != 1.0
    {
        put("routed_scaling_factor", r.routed_scaling_factor.to_string());
    }
    if r.method == RoutingMethod::SigmoidRenorm || !r.norm_topk_prob {
        put("norm_topk_prob", r.norm_topk_prob.to_string());
    }
    m
}

/// The layer-file tensors of one projection: `name` (elements), `{name}_scale` and, for nvfp4,
/// `{name}_global_scale` — what `write_layer` stores and the Python package's
/// `quantize_weights` returns.
pub fn projection_tensors(name: &str, t: &QuantizedTensor, out: &mut Vec<(String, HostTensor)>) {
    let shape = vec![t.experts, t.rows, stored_cols(t.format, t.cols)];
    // Bytes clones share a memory map or copy a Vec; the writer streams them either way.
    out.push((
        name.into(),
        HostTensor {
            dtype: element_dtype(t.format),
            shape,
            bytes: t.data.clone(),
        },
    ));
    let Some((dtype, shape)) = scale_spec(t.format, t.experts, t.rows, t.cols) else {
        return;
    };
    let bytes: Vec<u8> = match &t.scales {
        BlockScales::None => return,
        BlockScales::PerExpert(s) | BlockScales::Block128(s) => {
            s.iter().flat_map(|v| v.to_le_bytes()).collect()
        }
        BlockScales::Ue8m0(b) | BlockScales::E4m3(b) => b.clone(),
    };
    out.push((
        format!("{name}_scale"),
        HostTensor::from_u8(dtype, shape, bytes),
    ));
    if t.format == WeightFormat::Nvfp4 {
        out.push((
            format!("{name}_global_scale"),
            HostTensor::from_f32(vec![t.experts], &t.global_scales),
        ));
    }
}

/// Writes a layer file atomically. The layer must hold all experts and the whole I: an EP/TP shard
/// is not a layer file (its E and I would not describe the layer it came from).
pub fn write_layer(path: &Path, layer: &MoeLayer) -> Result<()> {
    write_layer_with_router(path, layer, None)
}

/// [`write_layer`] with the layer's router beside it ([`Router`]), as `convert` writes a
/// checkpoint's layer.
pub fn write_layer_with_router(
    path: &Path,
    layer: &MoeLayer,
    router: Option<&Router>,
) -> Result<()> {
    let (c, w) = (layer.config(), layer.weights());
    if c.local_experts != (0..c.num_experts) || !c.parallelism.is_single() {
        return Err(MoeError::invalid(
            format!("writing {}", path.display()),
            format!(
                "a sharded layer (experts {:?} of {}, {:?}) cannot be written as a layer file",
                c.local_experts, c.num_experts, c.parallelism
            ),
        ));
    }
    let mut tensors = Vec::new();
    projection_tensors("w13", &w.w13, &mut tensors);
    projection_tensors("w2", &w.w2, &mut tensors);
    let (e, m, h) = (c.num_experts, c.w13_rows(), c.hidden);
    for (name, v, shape) in [
        ("w13_bias", &w.w13_bias, vec![e, m]),
        ("w2_bias", &w.w2_bias, vec![e, h]),
        ("router_bias", &w.router_bias, vec![e]),
    ] {
        if let Some(v) = v {
            tensors.push((name.to_string(), HostTensor::from_f32(shape, v)));
        }
    }
    for (name, s) in [
        ("w13_input_scale", w.w13_input_scale),
        ("w2_input_scale", w.w2_input_scale),
    ] {
        if let Some(s) = s {
            tensors.push((name.to_string(), HostTensor::from_f32(vec![], &[s])));
        }
    }
    if let Some(r) = router {
        r.weight.expect_shape("router_weight", &[e, h])?;
        tensors.push(("router_weight".into(), r.weight.clone()));
        if let Some(b) = &r.linear_bias {
            tensors.push((
                "router_linear_bias".into(),
                HostTensor::from_f32(vec![e], b),
            ));
        }
    }
    write_tensors(path, &tensors, layer_metadata(c))
}
