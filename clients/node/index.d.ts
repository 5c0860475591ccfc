// Types of the forkd client (index.js). Field names are forkd.proto's in
// camelCase; 64-bit integers are numbers.

export declare const DEFAULT_ADDR: string;

export interface ClientOptions {
  /** `unix:PATH` or `HOST:PORT` [FORKD_ADDR, else unix:/run/forkd/forkd.sock]. */
  addr?: string;
  /** Bearer token for TCP. */
  token?: string;
  /** File holding the token [FORKD_TOKEN_FILE]. */
  tokenFile?: string;
}

export interface Seed {
  id: string; key: string; name: string; createdUnixMs: number; sourcePid: number;
  imageBytes: number; vmas: number; pauseUs: number; captureUs: number; node: string;
  childrenSpawned: number;
}

export type EventKind = 'started' | 'running' | 'output' | 'exited' | 'failed';

export interface InstanceEvent {
  kind: EventKind; instanceId: string; seedId: string; pid: number; index: number;
  timeToRunningMs?: number;
  data?: Buffer; sinceSpawnMs?: number;
  exitCode?: number | null; signal?: number | null; reason?: string;
  stdout?: Buffer; faults?: number; pagesInstalled?: number;
}

export interface Child {
  index: number; instanceId: string; pid: number; timeToRunningMs?: number;
  exitCode: number | null; signal: number | null; reason: string; stdout: Buffer;
  faults: number; pagesInstalled?: number;
}

export interface Instance {
  id: string; seedId: string; pid: number; state: string;
  labels: Record<string, string>; startedUnixMs: number;
}

export interface NodeInfo {
  version: string; hostname: string; kernel: string; vdsoHash: string;
  transports: { name: string; available: boolean; reason: string }[];
  cpus: number; memoryBytes: number; seeds: number; instancesRunning: number;
  transport: string; transportSelected: string; transportReason: string; pssBytes: number;
}

export interface CreateSeedOptions {
  pid?: number; command?: string[]; readyLine?: string; readyTimeoutMs?: number;
  cwd?: string; env?: Record<string, string>; name?: string;
}

export interface SpawnOptions {
  count?: number; stdin?: Buffer | string; prefetch?: '' | 'off' | 'window' | 'recorded';
  eager?: boolean; labels?: Record<string, string>; args?: string; origin?: string;
  noTemplate?: boolean; captureStdout?: boolean;
}

export declare class ForkdError extends Error {
  /** The gRPC status number (grpc.status). */
  code: number;
  /** Its name, e.g. NOT_FOUND. */
  codeName: string;
  details: string;
}

export declare class ForkdClient {
  constructor(opts?: ClientOptions);
  readonly addr: string;
  close(): void;
  createSeed(opts: CreateSeedOptions): Promise<Seed>;
  getSeed(id: string, key?: string): Promise<Seed>;
  listSeeds(): Promise<Seed[]>;
  dropSeed(id: string, key?: string): Promise<void>;
  spawn(seed: string, opts?: SpawnOptions): AsyncGenerator<InstanceEvent>;
  prepare(seed: string, opts?: { prefetch?: string; eager?: boolean; origin?: string; noTemplate?: boolean }): Promise<{ seed: string; templateBuilt: boolean; ms: number }>;
  run(seed: string, opts?: SpawnOptions): Promise<Child[]>;
  listInstances(seedId?: string): Promise<Instance[]>;
  kill(instanceId: string): Promise<void>;
  watch(): AsyncGenerator<InstanceEvent>;
  nodeInfo(): Promise<NodeInfo>;
}

export declare function parseRef(ref: string): { origin: string; id: string; key: string };
export declare function protoPath(): string;
export declare function loadForkd(proto?: string): any;
