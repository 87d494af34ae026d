// Stage sizes for progress labels: the engine's plan_stages (selfcascade/plan.py) in
// JavaScript, so "stage 2/3" can say which size it is sampling. Only a label: when the
// worker's stage count disagrees with this plan, labels fall back to the stage number.

const MAX_GROWTH_PER_SIDE = 2;

const roundTo = (value, multiple, upper) => {
  const rounded = Math.max(multiple, Math.round(value / multiple) * multiple);
  return rounded > upper ? Math.min(rounded, Math.max(upper, multiple)) : rounded;
};
const floorTo = (value, multiple) => Math.max(multiple, Math.floor(value / multiple) * multiple);

export function planStages(width, height, nativeWidth, nativeHeight, multiple, method) {
  const target = { width, height };
  const nativePixels = nativeWidth * nativeHeight;
  if (method === "direct" || width * height <= nativePixels) return [target];
  const aspect = width / height;
  const base = {
    width: roundTo(Math.sqrt(nativePixels * aspect), multiple, width),
    height: roundTo(Math.sqrt(nativePixels / aspect), multiple, height),
  };
  const growth = Math.max(width / base.width, height / base.height);
  const upscales = Math.max(1, Math.ceil(Math.log(growth) / Math.log(MAX_GROWTH_PER_SIDE) - 1e-9));
  const sizes = [base];
  for (let i = 1; i < upscales; i += 1) {
    const f = i / upscales;
    const prev = sizes[sizes.length - 1];
    sizes.push({
      width: Math.min(
        roundTo(base.width * (width / base.width) ** f, multiple, width),
        floorTo(prev.width * MAX_GROWTH_PER_SIDE, multiple),
      ),
      height: Math.min(
        roundTo(base.height * (height / base.height) ** f, multiple, height),
        floorTo(prev.height * MAX_GROWTH_PER_SIDE, multiple),
      ),
    });
  }
  sizes.push(target);
  return sizes.filter(
    (s, i) => i === 0 || s.width !== sizes[i - 1].width || s.height !== sizes[i - 1].height,
  );
}

export function stageName(progress, plan) {
  const name = `stage ${progress.stage}/${progress.stages}`;
  const size = plan && plan.length === progress.stages ? plan[progress.stage - 1] : null;
  return size ? `${name}: ${size.width}×${size.height}` : name;
}
