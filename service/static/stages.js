// Progress labels. The worker reports the size each stage samples at (progress.width and
// .height, metrics.stage_sizes), so the page never re-plans stages itself.

const sizeOf = (width, height) => (width && height ? `${width}×${height}` : null);

export function stageName(progress) {
  const name = `stage ${progress.stage}/${progress.stages}`;
  const size = sizeOf(progress.width, progress.height);
  return size ? `${name}: ${size}` : name;
}

export function stageTimings(metrics) {
  const sizes = metrics.stage_sizes || [];
  return (metrics.stage_seconds || []).map((seconds, i) => {
    const size = sizes[i] ? ` ${sizeOf(sizes[i][0], sizes[i][1])}` : "";
    return `stage ${i + 1}${size}: ${seconds.toFixed(2)} s`;
  });
}
